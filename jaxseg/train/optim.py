"""Optimisers and learning-rate schedules (nnU-Net, Isensee et al. 2021; Kamraoui et al., DeepLesionBrain)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxseg.config import OptimConfig
from jaxseg.train.finetune import freeze


def poly_schedule(lr0: float, total: int, power: float = 0.9, steps_per_unit: int = 1):
    """nnU-Net's poly decay `lr0 * (1 - t / T)^power`; t counts epochs when steps_per_unit is the number
    of steps per epoch (nnU-Net steps the scheduler once per epoch), steps when it is 1."""

    def schedule(step):
        t = jnp.floor_divide(step, steps_per_unit).astype(jnp.float32)
        return lr0 * jnp.maximum(1.0 - t / total, 0.0) ** power

    return schedule


def learning_rate(cfg: OptimConfig, lr: float, epochs: int, steps_per_epoch: int):
    if cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    if cfg.poly_per == "epoch":
        return poly_schedule(lr, epochs, cfg.poly_power, steps_per_epoch)
    return poly_schedule(lr, epochs * steps_per_epoch, cfg.poly_power, 1)


def _base(cfg: OptimConfig, lr) -> optax.GradientTransformation:
    if cfg.kind == "sgd":
        # torch.optim.SGD's weight_decay adds wd * param to the gradient before momentum.
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                           optax.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov))
    if cfg.kind == "adam":
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(lr, b1=0.9, b2=0.999))
    raise ValueError(f"unknown optimiser {cfg.kind!r}; choose sgd or adam")


def make_optimizer(cfg: OptimConfig, epochs: int, steps_per_epoch: int, params=None,
                   trainable=None) -> optax.GradientTransformation:
    """Gradient clipping, then SGD-Nesterov or Adam with the schedule.

    `optim.age_head_lr` gives the AgeU-Net head its own learning rate (the neonatal paper's remedy for its
    diverging MSE). `trainable` (a pytree of bools like params) freezes the False leaves: their updates
    are exactly zero and no optimiser state is kept for them.
    """
    main = _base(cfg, learning_rate(cfg, cfg.lr, epochs, steps_per_epoch))
    if cfg.age_head_lr is not None:
        if params is None:
            raise ValueError("optim.age_head_lr needs the parameter tree to find the age head")
        age = _base(cfg, learning_rate(cfg, cfg.age_head_lr, epochs, steps_per_epoch))
        labels = {k: ("age" if k == "age_head" else "main") for k in params}
        main = optax.multi_transform({"main": main, "age": age}, labels)
    clip = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip is not None else []
    core = optax.chain(*clip, main)
    if trainable is None:
        return core
    return freeze(core, trainable)
