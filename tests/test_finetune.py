"""Transfer-learning masks (jaxseg.train.finetune): which stages train, and that frozen ones never move."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseg.config import OptimConfig
from jaxseg.models.topology import Topology
from jaxseg.models.unet import UNet3D
from jaxseg.train import finetune as ft
from jaxseg.train.optim import make_optimizer


def unet_params(strides, size, age_head=False, seed=0):
    """Random float32 parameters with the exact tree of a tiny UNet3D (shapes by eval_shape: no compile)."""
    n = len(strides)
    topo = Topology(tuple(strides), ((3, 3, 3),) * n, (2,) * n, size)
    model = UNet3D(3, topo, age_head=age_head)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, *size, 1)))["params"], jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes)


# 6 stages like the paper's 128^3 network (5 encoder levels + bottleneck), on a 16^3 input: anisotropic
# strides keep the bottleneck at 4^3 so the AgeU-Net head fits.
STRIDES_6 = ((1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 1, 1), (1, 2, 2))
STRIDES_5 = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))  # 16^3 -> 1^3
STRIDES_4 = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))  # 8^3 -> 1^3


@pytest.fixture(scope="module")
def params6():
    return unet_params(STRIDES_6, (16, 16, 16), age_head=True)


ALL6 = {f"encoder_{i}" for i in range(5)} | {f"decoder_{i}" for i in range(5)} | {
    f"head_{i}" for i in range(5)} | {"bottleneck", "age_head"}
EXPECTED6 = {
    "none": set(),
    "shallow": {"bottleneck", "age_head", "encoder_4", "decoder_4", "head_4"},
    "medium": {"bottleneck", "age_head", "encoder_4", "decoder_4", "head_4", "encoder_3", "decoder_3", "head_3"},
    # medium + two more blocks on each path; the full-resolution level (and the output head) stays frozen
    "deep": {"bottleneck", "age_head", "encoder_4", "decoder_4", "head_4", "encoder_3", "decoder_3", "head_3",
             "encoder_2", "decoder_2", "head_2", "encoder_1", "decoder_1", "head_1"},
    "full": ALL6,
}


def stage_flags(mask):
    out = {}
    for name, sub in mask.items():
        flags = set(jax.tree.leaves(sub))
        assert len(flags) == 1, f"{name} is partly trainable"
        out[name] = flags.pop()
    return out


@pytest.mark.parametrize("strategy", ft.STRATEGIES)
def test_mask_selects_the_paper_stages(params6, strategy):
    assert set(params6) == ALL6
    mask = ft.trainable_mask(params6, strategy)
    assert jax.tree.structure(mask) == jax.tree.structure(params6)
    assert all(type(x) is bool for x in jax.tree.leaves(mask))
    flags = stage_flags(mask)
    assert {k for k, v in flags.items() if v} == EXPECTED6[strategy]
    assert set(ft.trainable_stages(mask)) == EXPECTED6[strategy]
    assert ft.trainable_mask(params6, strategy, n_stages=6) == mask


def test_five_stage_network_matches_the_reference_code():
    # The authors' 96^3 network has 5 stages; their code's "shallow" (= the paper's deep) trains all
    # encoder/decoder levels but the full-resolution one.
    params = unet_params(STRIDES_5, (16, 16, 16))
    expected = {
        "shallow": {"bottleneck", "encoder_3", "decoder_3", "head_3"},
        "medium": {"bottleneck", "encoder_3", "decoder_3", "head_3", "encoder_2", "decoder_2", "head_2"},
        "deep": {"bottleneck", "encoder_3", "decoder_3", "head_3", "encoder_2", "decoder_2", "head_2",
                 "encoder_1", "decoder_1", "head_1"},
    }
    for strategy, want in expected.items():
        flags = stage_flags(ft.trainable_mask(params, strategy))
        assert {k for k, v in flags.items() if v} == want, strategy


def test_too_few_stages_is_refused_not_aliased():
    params = unet_params(STRIDES_4, (8, 8, 8))
    assert {k for k, v in stage_flags(ft.trainable_mask(params, "medium")).items() if v} == {
        "bottleneck", "encoder_2", "decoder_2", "head_2", "encoder_1", "decoder_1", "head_1"}
    with pytest.raises(ValueError, match=r"'deep' needs a U-Net with at least 5 stages.*has 4"):
        ft.trainable_mask(params, "deep")


def test_deep_supervision_heads_follow_their_decoder_level():
    # Only head_0 when deep supervision is off: it is the output head, trainable under full only.
    n = len(STRIDES_6)
    topo = Topology(STRIDES_6, ((3, 3, 3),) * n, (2,) * n, (16, 16, 16))
    model = UNet3D(3, topo, deep_supervision=False)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 16, 16, 16, 1)))["params"], jax.random.key(0))
    assert {k for k in shapes if k.startswith("head_")} == {"head_0"}
    for strategy in ("shallow", "medium", "deep"):
        assert stage_flags(ft.trainable_mask(shapes, strategy))["head_0"] is False
    assert stage_flags(ft.trainable_mask(shapes, "full"))["head_0"] is True


def test_variables_dict_and_describe(params6):
    mask = ft.trainable_mask({"params": params6}, "shallow")
    assert set(mask) == {"params"} and mask["params"] == ft.trainable_mask(params6, "shallow")
    text = ft.describe(ft.trainable_mask(params6, "shallow"), params6)
    assert text.startswith("trainable: encoder_4, bottleneck, age_head, decoder_4, head_4; frozen: encoder_0,")
    n_train = sum(x.size for k in EXPECTED6["shallow"] for x in jax.tree.leaves(params6[k]))
    n_all = sum(x.size for x in jax.tree.leaves(params6))
    assert f"{n_train:,} of {n_all:,} parameters trainable" in text
    assert "trainable: (none)" in ft.describe(ft.trainable_mask(params6, "none"))
    assert "frozen: (none)" in ft.describe(ft.trainable_mask(params6, "full"))


def test_clear_errors(params6):
    with pytest.raises(ValueError, match=r"unknown fine-tuning strategy 'bottleneck'; valid: none, shallow, "
                                         r"medium, deep, full"):
        ft.trainable_mask(params6, "bottleneck")
    with pytest.raises(ValueError, match=r"no U-Net stage names.*\['conv', 'dense'\]"):
        ft.trainable_mask({"conv": {"kernel": jnp.ones(3)}, "dense": {"kernel": jnp.ones(2)}}, "full")
    with pytest.raises(ValueError, match=r"not U-Net stages: \['extra'\]"):
        ft.trainable_mask({**params6, "extra": {"w": jnp.ones(1)}}, "full")
    with pytest.raises(ValueError, match=r"n_stages=4 but the parameter tree has 6 stages"):
        ft.trainable_mask(params6, "shallow", n_stages=4)
    with pytest.raises(TypeError, match="Python bools"):
        ft.freeze(optax.adam(1e-3), jax.tree.map(lambda x: jnp.ones((), bool), params6))


def adam_chain():
    # clipping and weight decay inside, as make_optimizer builds it: neither may touch frozen leaves.
    return optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-2), optax.adam(1e-2))


def run_steps(tx, params, grads_seq):
    state = tx.init(params)
    updates = None
    for g in grads_seq:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state, updates


@pytest.fixture(scope="module")
def grads6(params6):
    rng = np.random.default_rng(1)
    # nonzero on every element of every leaf (a real U-Net gradient is ~0 on conv biases before a norm)
    return [jax.tree.map(lambda p: jnp.asarray(rng.uniform(0.1, 1.0, p.shape) * rng.choice([-1, 1], p.shape),
                                               jnp.float32), params6) for _ in range(3)]


@pytest.mark.parametrize("strategy", ft.STRATEGIES)
def test_frozen_parameters_are_bit_identical_and_trainable_ones_move(params6, grads6, strategy):
    mask = ft.trainable_mask(params6, strategy)
    new, state, last = run_steps(ft.freeze(adam_chain(), mask), params6, grads6)
    flat_old, flat_new = jax.tree.leaves(params6), jax.tree.leaves(new)
    flat_mask, flat_upd = jax.tree.leaves(mask), jax.tree.leaves(last)
    for old, nw, m, u in zip(flat_old, flat_new, flat_mask, flat_upd):
        if m:
            assert np.all(np.asarray(nw) != np.asarray(old))
        else:
            assert np.asarray(nw).tobytes() == np.asarray(old).tobytes()
            assert not np.any(np.asarray(u))
    # no optimiser moments for frozen leaves: Adam keeps mu and nu for the trainable elements only (the
    # other float state; its step count is an int)
    n_trainable = sum(x.size for x, m in zip(flat_old, flat_mask) if m)
    state_elems = sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
    assert state_elems == 2 * n_trainable
    if strategy == "none":
        assert all(np.asarray(n).tobytes() == np.asarray(o).tobytes() for n, o in zip(flat_new, flat_old))


def test_full_equals_the_unmasked_optimiser_exactly(params6, grads6):
    tx = adam_chain()
    masked, _, _ = run_steps(ft.freeze(tx, ft.trainable_mask(params6, "full")), params6, grads6)
    plain, _, _ = run_steps(tx, params6, grads6)
    for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(plain)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("strategy", ["shallow", "deep"])
def test_trainable_part_steps_as_if_alone(params6, grads6, strategy):
    # The trainable stages take exactly the steps the unmasked optimiser takes on them alone: clipping
    # norm, weight decay and moments do not see the frozen stages.
    mask = ft.trainable_mask(params6, strategy)
    masked, _, _ = run_steps(ft.freeze(adam_chain(), mask), params6, grads6)
    keep = EXPECTED6[strategy]
    sub = {k: v for k, v in params6.items() if k in keep}
    alone, _, _ = run_steps(adam_chain(), sub, [{k: g[k] for k in keep} for g in grads6])
    for k in keep:
        for a, b in zip(jax.tree.leaves(masked[k]), jax.tree.leaves(alone[k])):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_make_optimizer_trainable_is_the_same_masking(params6, grads6):
    cfg = OptimConfig(kind="adam", lr=1e-2, grad_clip=1.0)
    mask = ft.trainable_mask(params6, "medium")
    a, _, _ = run_steps(ft.freeze(make_optimizer(cfg, 2, 2), mask), params6, grads6)
    b, _, _ = run_steps(make_optimizer(cfg, 2, 2, trainable=mask), params6, grads6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_config_fields():
    from jaxseg.config import Config, ConfigError, TrainConfig, load_config

    assert Config().train.finetune == "full" and Config().train.init_from is None
    assert load_config(None, ["train.finetune=null"]).train.finetune is None
    cfg = load_config(None, ["train.finetune=medium", "train.init_from=runs/old/ckpt"])
    assert (cfg.train.finetune, cfg.train.init_from) == ("medium", "runs/old/ckpt")
    with pytest.raises(ConfigError, match=r"train\.finetune: 'shallow' freezes pre-trained stages, so it needs "
                                          r"train\.init_from"):
        load_config(None, ["train.finetune=shallow"])
    with pytest.raises(ConfigError, match=r"train\.finetune: expected one of 'none', 'shallow', 'medium', 'deep', "
                                          r"'full' or null, got 'bottleneck'"):
        load_config(None, ["train.finetune=bottleneck"])
    with pytest.raises(ConfigError, match=r"TrainConfig\.init_from: must be a run or checkpoint directory"):
        TrainConfig(init_from="  ")
