import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from jaxseg.config import load_config
from jaxseg.data.augment import PRESETS
from jaxseg.models import build_model
from jaxseg.train import optim
from jaxseg.train.step import (dro_sample_weights, init_state, jit_step, make_step, pmap_step, replicate,
                               split_for_pmap, unreplicate)

N_CASES = 10


def tiny_cfg(*overrides):
    return load_config(None, ["data.patch_size=[8,8,8]", "model.features_base=4", "model.features_max=8",
                              "data.num_classes=3", "train.epochs=2",
                              "train.steps_per_epoch=2", *overrides])


def tiny_batch(n=8, size=10, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, size, size, size, 1)).astype(np.float32)
    label = np.zeros((n, size, size, size), np.int32)
    label[:, 2:6, 2:7, 3:8] = 1
    label[:, 6:9, 5:9, 1:4] = 2
    image += label[..., None]
    return {"image": image, "label": label, "mask": np.ones(label.shape, np.float32),
            "case_index": (np.arange(n) % N_CASES).astype(np.int32)}


def setup(cfg):
    model = build_model(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, *cfg.data.patch_size, 1)))["params"]
    tx = optim.make_optimizer(cfg.optim, cfg.train.epochs, cfg.train.steps_per_epoch)
    return model, params, tx


def test_poly_schedule_per_epoch_and_per_step():
    s = optim.poly_schedule(1e-2, 10, 0.9, steps_per_unit=5)
    assert float(s(0)) == pytest.approx(1e-2)
    assert float(s(4)) == pytest.approx(1e-2)  # still epoch 0
    assert float(s(5)) == pytest.approx(1e-2 * 0.9**0.9)
    assert float(s(49)) == pytest.approx(1e-2 * 0.1**0.9)
    assert float(optim.poly_schedule(1.0, 4)(2)) == pytest.approx(0.5**0.9)


def test_sgd_matches_torch_semantics():
    # torch SGD(nesterov, momentum m, weight_decay wd), first two steps, by hand.
    cfg = tiny_cfg("optim.schedule=constant", "optim.grad_clip=null")
    tx = optim.make_optimizer(cfg.optim, 1, 1)
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.25])}
    s = tx.init(p)
    lr, m, wd = 1e-2, 0.99, 3e-5
    buf = np.zeros(2)
    w = np.array([1.0, -2.0])
    for _ in range(2):
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        d = np.array([0.5, 0.25]) + wd * w
        buf = m * buf + d
        w = w - lr * (d + m * buf)
    np.testing.assert_allclose(p["w"], w, rtol=1e-6)


def test_frozen_parameters_do_not_move_and_skip_clip_norm():
    cfg = tiny_cfg("optim.grad_clip=1.0")
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    tx = optim.make_optimizer(cfg.optim, 1, 1, trainable={"a": True, "b": False})
    s = tx.init(params)
    g = {"a": jnp.full(3, 0.1), "b": jnp.full(2, 1e6)}
    u, s = tx.update(g, s, params)
    new = optax.apply_updates(params, u)
    np.testing.assert_array_equal(new["b"], params["b"])
    # clip by the trainable norm only (0.17 < 1: unclipped) -> the step equals the unclipped one
    ref = optim.make_optimizer(cfg.optim.__class__(**{**cfg.optim.__dict__, "grad_clip": None}), 1, 1)
    u_ref, _ = ref.update({"a": g["a"]}, ref.init({"a": params["a"]}), {"a": params["a"]})
    np.testing.assert_allclose(new["a"], params["a"] + u_ref["a"], rtol=1e-6)


@pytest.mark.parametrize("mode", ["sampling_is", "weighting"])
def test_dro_weights_follow_spec(mode):
    cfg = tiny_cfg("dro.enabled=true", f"dro.mode={mode}", "dro.beta=10")
    table = jnp.linspace(0.5, 1.5, N_CASES)
    losses = jnp.array([0.2, 1.0, 2.0, 0.9])
    idx = jnp.array([0, 3, 7, 9])
    w = dro_sample_weights(cfg, losses, idx, table)
    if mode == "sampling_is":
        ref = np.clip(np.exp(10 * (np.asarray(losses) - np.asarray(table)[idx])), 0.1, 10)
    else:
        t = np.asarray(table).copy()
        t[np.asarray(idx)] = losses
        q = np.exp(10 * t - (10 * t).max())
        ref = N_CASES * (q / q.sum())[idx]
    np.testing.assert_allclose(w, ref, rtol=1e-5)


@pytest.mark.slow
def test_one_step_jit_8_devices_equals_1_device_equals_pmap():
    assert jax.device_count() == 8
    cfg = tiny_cfg("dro.enabled=true", "dro.mode=sampling_is")
    model, params, tx = setup(cfg)
    aug = PRESETS["nnunet"]
    step = make_step(model, cfg, tx, aug, cfg.data.patch_size)
    batch = tiny_batch()
    key = jax.random.key(42)
    table = jnp.full((N_CASES,), 2.0)

    results = {}
    for name, devices in (("jit8", jax.devices()), ("jit1", jax.devices()[:1])):
        f = jit_step(step, Mesh(np.array(devices), ("data",)))
        state, metrics = f(init_state(jax.tree.map(jnp.copy, params), tx), batch, key, table)  # donated
        results[name] = (state.params, metrics["per_sample_loss"], metrics["loss"])

    pstep = pmap_step(make_step(model, cfg, tx, aug, cfg.data.patch_size, axis_name="data"))
    devices = jax.devices()
    state, metrics = pstep(replicate(init_state(params, tx), devices), split_for_pmap(batch, 8), key, table)
    results["pmap"] = (unreplicate(state).params, np.asarray(metrics["per_sample_loss"]).reshape(-1),
                       metrics["loss"][0])

    ref = results["jit1"]
    for name in ("jit8", "pmap"):
        np.testing.assert_allclose(results[name][1], ref[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(results[name][2], ref[2], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(results[name][0]), jax.tree.leaves(ref[0])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    moved = sum(float(jnp.abs(a - b).sum()) for a, b in zip(jax.tree.leaves(ref[0]), jax.tree.leaves(params)))
    assert moved > 0


def test_nonfinite_loss_is_skipped():
    cfg = tiny_cfg()
    model, params, tx = setup(cfg)
    step = jax.jit(make_step(model, cfg, tx, PRESETS["none"], cfg.data.patch_size))
    batch = tiny_batch(n=2)
    batch["image"][0, 5, 5, 5, 0] = np.nan  # inside the centre crop to the 8^3 patch
    state = init_state(params, tx)
    new, metrics = step(state, batch, jax.random.key(0), jnp.full((N_CASES,), 2.0))
    assert not bool(metrics["finite"])
    assert int(new.step) == 1 and int(new.nonfinite) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(state.opt_state)):
        np.testing.assert_array_equal(a, b)
    batch["image"] = np.nan_to_num(batch["image"])
    new, metrics = step(new, batch, jax.random.key(0), jnp.full((N_CASES,), 2.0))
    assert bool(metrics["finite"]) and int(new.nonfinite) == 0
