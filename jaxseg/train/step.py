"""One training step `(state, batch, key, dro_table) -> (state, metrics)`, and its jit and pmap forms.

The step augments on the device, computes per-sample losses (deep supervision, voxel masks, optional
age MSE), weights them for DRO (Fidon et al. 2021, nnU-Net-DRO), and applies the update only when the
loss and the gradient are finite. Per-sample augmentation keys are
`fold_in(fold_in(key, step), global sample index)`, so the jit (any number of devices) and pmap forms
see identical augmentations.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxseg.config import Config
from jaxseg.data.augment import AugmentParams, augment_sample
from jaxseg.losses import cross_entropy, dice_ce, generalised_jaccard, mse, soft_dice
from jaxseg.losses import dro
from jaxseg.losses.deep_supervision import deep_supervision_loss, ds_weights


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken, skipped ones included
    params: Any
    opt_state: Any
    nonfinite: jax.Array  # consecutive steps whose loss or gradient was not finite


def init_state(params, optimizer) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), jnp.zeros((), jnp.int32))


def segmentation_loss_fn(cfg: Config):
    lc = cfg.loss
    kind = lc.kind
    dice = {"smooth": lc.smooth, "batch_dice": lc.batch_dice, "include_background": lc.dice_background,
            "activation": lc.dice_activation, "squared": lc.dice_squared}
    if kind == "dice_ce":
        return functools.partial(dice_ce, **dice)
    if kind == "dice":
        return lambda lg, lb, m=None: -soft_dice(lg, lb, m, **dice)
    if kind == "ce":
        return cross_entropy
    if kind == "gen_jaccard":
        return generalised_jaccard
    raise ValueError(f"unknown loss {kind!r}")


def seg_losses(cfg: Config, seg_outputs, label, mask=None):
    """(B,) deep-supervised segmentation loss of a list of logits (highest resolution first), as `cfg.loss` says."""
    weights = ds_weights(len(seg_outputs), cfg.loss.ds_weights)
    return deep_supervision_loss(segmentation_loss_fn(cfg), seg_outputs, label, mask, weights=weights,
                                 mode=cfg.loss.ds_mode, resize_method=cfg.loss.ds_upsample)


def per_sample_losses(model, cfg: Config, params, image, label, mask, age=None, dropout_key=None):
    """(B,) losses of one forward pass: deep-supervised segmentation loss (+ age_weight * MSE)."""
    out = model.apply({"params": params}, image)
    losses = seg_losses(cfg, out.seg, label, mask)
    if out.age is not None and age is not None:
        losses = losses + cfg.loss.age_weight * mse(out.age, age)
    return losses


def dro_sample_weights(cfg: Config, losses, case_index, table, axis_name=None):
    """Per-sample weights, constant w.r.t. the parameters (Fidon et al. 2021, eq. 6-7).

    sampling_is: clip(exp(beta (l - L_stale)), w_min, w_max), from the table before its update.
    weighting:   n * softmax(beta * L)_i with the batch's fresh losses written into the table; with uniform
                 sampling its expectation is the gradient of eq. 6, sum_i softmax(beta L)_i grad L_i.
    sampling / ERM: 1 (the sampler does the work, or there is none).
    """
    d = cfg.dro
    losses = jax.lax.stop_gradient(losses)
    if not d.enabled or d.mode == "sampling":
        return jnp.ones_like(losses)
    if d.mode == "sampling_is":
        return dro.importance_weights(losses, table[case_index], d.beta, d.w_min, d.w_max)
    if d.mode == "weighting":
        all_idx, all_l = case_index, losses
        if axis_name is not None:
            all_idx = jax.lax.all_gather(case_index, axis_name).reshape(-1)
            all_l = jax.lax.all_gather(losses, axis_name).reshape(-1)
        q = dro.dro_weights(table.at[all_idx].set(all_l), d.beta)
        return jax.lax.stop_gradient(table.shape[0] * q[case_index])
    raise ValueError(f"unknown dro.mode {d.mode!r}")


def make_step(model, cfg: Config, optimizer, aug: AugmentParams, patch_size, axis_name: str | None = None):
    """The step function. With `axis_name` it runs per device under pmap and reduces over that axis."""
    patch_size = tuple(int(p) for p in patch_size)

    def step(state: TrainState, batch: dict, key, table):
        n_local = batch["image"].shape[0]
        if axis_name is None:
            n_global, offset = n_local, 0
        else:
            n_global = n_local * jax.lax.psum(1, axis_name)
            offset = jax.lax.axis_index(axis_name) * n_local
        step_key = jax.random.fold_in(key, state.step)
        keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(offset + jnp.arange(n_local))
        split = jax.vmap(jax.random.split)(keys)
        aug_keys, drop_keys = split[:, 0], split[:, 1]
        image, label, mask = jax.vmap(augment_sample, in_axes=(0, 0, 0, 0, None, None))(
            aug_keys, batch["image"], batch["label"], batch["mask"], aug, patch_size)
        dropout_key = drop_keys[0] if cfg.model.dropout > 0 else None

        def objective(params):
            losses = per_sample_losses(model, cfg, params, image, label, mask, batch.get("age"), dropout_key)
            w = dro_sample_weights(cfg, losses, batch["case_index"], table, axis_name)
            return jnp.sum(w * losses) / n_global, (losses, w)

        (loss, (losses, w)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        if axis_name is not None:
            loss, grads = jax.lax.psum((loss, grads), axis_name)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite step changes nothing but the counters: its update never reaches the parameters.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state),
                               jnp.where(finite, 0, state.nonfinite + 1))
        metrics = {"loss": loss, "per_sample_loss": losses, "weights": w, "grad_norm": grad_norm,
                   "finite": finite}
        return new_state, metrics

    return step


def jit_step(step_fn, mesh: Mesh):
    """Data parallelism by sharding: the global batch split on the mesh's `data` axis, everything else
    replicated; the state is donated."""
    data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    return jax.jit(step_fn, in_shardings=(repl, data, repl, repl),
                   out_shardings=(repl, {"loss": repl, "per_sample_loss": data, "weights": data,
                                         "grad_norm": repl, "finite": repl}),
                   donate_argnums=(0,))


def pmap_step(step_fn_with_axis, devices=None):
    """`parallel: pmap`: the same step under jax.pmap (state replicated, batch split on a leading axis)."""
    return jax.pmap(step_fn_with_axis, axis_name="data", in_axes=(0, 0, None, None), donate_argnums=(0,),
                    devices=devices)


def split_for_pmap(batch: dict, n_devices: int) -> dict:
    def split(x):
        x = np.asarray(x)
        if x.shape[0] % n_devices:
            raise ValueError(f"batch of {x.shape[0]} does not split over {n_devices} devices")
        return x.reshape(n_devices, x.shape[0] // n_devices, *x.shape[1:])

    return jax.tree.map(split, batch)


def replicate(tree, devices):
    """A leading device axis for pmap (jax.device_put_replicated was removed from JAX)."""
    n = len(devices)
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), tree)


def unreplicate(tree):
    return jax.tree.map(lambda x: x[0], tree)
