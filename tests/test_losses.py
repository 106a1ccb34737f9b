"""Tests of jaxseg.losses.segmentation and jaxseg.losses.deep_supervision.

Reference values are computed independently (numpy, hand counts), never with the code under test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.losses import (
    cross_entropy,
    deep_supervision_loss,
    dice_ce,
    ds_weights,
    generalised_jaccard,
    mse,
    soft_dice,
)

B, S, C = 3, 6, 3


@pytest.fixture
def x64():
    prev = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", prev)


def _rand(seed, shape=(B, S, S, S), n_classes=C, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(*shape, n_classes)).astype(np.float32)
    labels = rng.integers(0, n_classes, size=shape).astype(np.int32)
    return logits, labels


# ----------------------------------------------------------------------------- numpy references
def np_softmax(x):
    x = np.asarray(x, np.float64)
    z = x - x.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_dice_one(p, lab, n_classes, smooth=1e-5, fg=True):
    """Dice score of one sample given probabilities p (N, C) and labels (N,)."""
    t = np.eye(n_classes)[lab]
    tp = (p * t).sum(0)
    fp = (p * (1 - t)).sum(0)
    fn = ((1 - p) * t).sum(0)
    dc = (2 * tp + smooth) / np.maximum(2 * tp + fp + fn + smooth, 1e-8)
    return dc[1:].mean() if fg else dc.mean()


def np_ce_one(logits, lab):
    ls = np_log_softmax(logits)
    return -ls[np.arange(lab.size), lab].mean()


def np_gjaccard_one(p, lab, n_classes, smooth=1.0):
    t = np.eye(n_classes)[lab]
    w = 1.0 / (1.0 + t.sum(0))
    inter = (p * t).sum(0)
    union = (p + t).sum(0) - inter
    return 1.0 - (smooth + (w * inter).sum()) / (smooth + (w * union).sum())


def _flat(x, b):
    return np.asarray(x)[b].reshape(-1, *np.asarray(x).shape[4:])


# ----------------------------------------------------------------------------- hand values
def test_dice_hand_computed_one_hot_logits():
    # 1 sample, 2x2x1 voxels, 3 classes; large logits => softmax is one-hot to ~1e-22.
    labels = np.array([[0, 1], [1, 2]], np.int32).reshape(1, 2, 2, 1)
    pred = np.array([[0, 1], [2, 2]], np.int32).reshape(1, 2, 2, 1)
    logits = 50.0 * np.eye(3, dtype=np.float32)[pred]
    # class 1: tp=1, fp=0, fn=1 -> 2/3 ; class 2: tp=1, fp=1, fn=0 -> 2/3; class 0: 1
    s = 1e-5
    want_fg = ((2 + s) / (3 + s) + (2 + s) / (3 + s)) / 2
    want_all = ((2 + s) / (2 + s) + 2 * (2 + s) / (3 + s)) / 3
    got = soft_dice(logits, labels)
    assert got.shape == (1,)
    np.testing.assert_allclose(got, [want_fg], rtol=1e-6)
    np.testing.assert_allclose(soft_dice(logits, labels, include_background=True), [want_all], rtol=1e-6)
    # an absent class predicted absent scores 1 (nnU-Net smooth / smooth)
    labels2 = np.zeros((1, 2, 2, 1), np.int32)
    logits2 = 50.0 * np.eye(3, dtype=np.float32)[labels2]
    np.testing.assert_allclose(soft_dice(logits2, labels2), [1.0], rtol=1e-6)
    # dice_ce = CE - dice, CE ~ 0 for confident correct predictions
    np.testing.assert_allclose(dice_ce(logits2, labels2), [-1.0], atol=1e-6)


def test_dice_random_vs_numpy():
    logits, labels = _rand(0)
    got = np.asarray(soft_dice(logits, labels))
    p = np_softmax(logits)
    want = [np_dice_one(_flat(p, b), labels[b].ravel(), C) for b in range(B)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_cross_entropy_vs_numpy():
    logits, labels = _rand(1)
    got = np.asarray(cross_entropy(logits, labels))
    want = [np_ce_one(_flat(logits, b), labels[b].ravel()) for b in range(B)]
    assert got.shape == (B,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(dice_ce(logits, labels)),
        np.array(want) - np.asarray(soft_dice(logits, labels)),
        rtol=1e-5,
    )


def test_batch_dice_equals_dice_of_concatenated_samples():
    logits, labels = _rand(2)
    bd = np.asarray(soft_dice(logits, labels, batch_dice=True))
    assert bd.shape == (B,)
    # concatenate the samples along X into a single sample
    cat_logits = np.concatenate(list(logits), axis=0)[None]
    cat_labels = np.concatenate(list(labels), axis=0)[None]
    ref = float(soft_dice(cat_logits, cat_labels)[0])
    np.testing.assert_allclose(bd, np.full(B, ref), rtol=1e-6)
    # ... and the numpy reference of the pooled voxels
    p = np_softmax(logits).reshape(-1, C)
    np.testing.assert_allclose(ref, np_dice_one(p, labels.ravel(), C), rtol=1e-5)
    # per-sample dice is genuinely different
    per = np.asarray(soft_dice(logits, labels))
    assert not np.allclose(per, bd)


def test_generalised_jaccard_vs_numpy():
    logits, labels = _rand(3)
    p = np_softmax(logits)
    want = [np_gjaccard_one(_flat(p, b), labels[b].ravel(), C) for b in range(B)]
    np.testing.assert_allclose(np.asarray(generalised_jaccard(logits, labels)), want, rtol=1e-5)
    want_s = [np_gjaccard_one(_flat(p, b), labels[b].ravel(), C, smooth=0.3) for b in range(B)]
    np.testing.assert_allclose(
        np.asarray(generalised_jaccard(logits, labels, smooth=0.3)), want_s, rtol=1e-5
    )
    # masked version against numpy on the labelled voxels only
    mask = np.random.default_rng(33).random(labels.shape) < 0.4
    want_m = [np_gjaccard_one(p[b][mask[b]], labels[b][mask[b]], C) for b in range(B)]
    np.testing.assert_allclose(
        np.asarray(generalised_jaccard(logits, labels, mask)), want_m, rtol=1e-5
    )


def test_mse():
    pred = np.array([1.0, 2.0, 3.0], np.float32)
    target = np.array([1.5, 2.0, 0.0], np.float32)
    want = (pred - target) ** 2
    np.testing.assert_allclose(mse(pred, target), want, rtol=1e-6)
    np.testing.assert_allclose(mse(pred[:, None], target), want, rtol=1e-6)
    np.testing.assert_allclose(mse(pred[:, None], target[:, None]), want, rtol=1e-6)
    assert mse(pred[:, None], target).shape == (3,)


# ----------------------------------------------------------------------------- masks
ALL_LOSSES = {
    "soft_dice": soft_dice,
    "cross_entropy": cross_entropy,
    "dice_ce": dice_ce,
    "dice_ce_bg": functools.partial(dice_ce, include_background=True),
    "generalised_jaccard": generalised_jaccard,
}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
@pytest.mark.parametrize("mask_dtype", [bool, np.float32])
def test_masked_loss_equals_cropped_loss(name, mask_dtype):
    fn = ALL_LOSSES[name]
    logits, labels = _rand(4)
    box = (slice(None), slice(1, 5), slice(0, 3), slice(2, 6))
    mask = np.zeros(labels.shape, mask_dtype)
    mask[box] = 1
    want = np.asarray(fn(logits[box], labels[box]))
    # garbage outside the box: nan / inf logits and out-of-range labels
    bad_logits = logits.copy()
    bad_labels = labels.copy()
    outside = ~mask.astype(bool)
    bad_logits[outside] = np.nan
    bad_logits[outside, 0] = np.inf
    bad_labels[outside] = 255
    got = np.asarray(fn(bad_logits, bad_labels, mask))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # gradients: finite, zero outside the box, equal to the cropped gradient inside
    g = np.asarray(jax.grad(lambda x: fn(x, bad_labels, mask).sum())(bad_logits))
    assert np.all(np.isfinite(g))
    assert np.all(g[outside] == 0)
    g_crop = np.asarray(jax.grad(lambda x: fn(x, labels[box]).sum())(logits[box]))
    np.testing.assert_allclose(g[box], g_crop, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_all_masked_sample_is_exactly_zero(name):
    fn = ALL_LOSSES[name]
    logits, labels = _rand(5)
    mask = np.random.default_rng(5).random(labels.shape) < 0.5
    mask[1] = False  # sample 1 has no labelled voxel
    out = np.asarray(fn(logits, labels, mask))
    assert out.shape == (B,)
    assert out[1] == 0.0
    # the other samples are unaffected by sample 1
    sub = [0, 2]
    np.testing.assert_allclose(out[sub], np.asarray(fn(logits[sub], labels[sub], mask[sub])), rtol=1e-6)
    g = np.asarray(jax.grad(lambda x: fn(x, labels, mask).sum())(jnp.asarray(logits)))
    assert np.all(np.isfinite(g))
    assert np.all(g[1] == 0)
    # fully unlabelled batch, jitted, also with smooth=0 for Dice (0/0 hazard)
    zero = np.zeros(labels.shape, bool)
    jfn = jax.jit(fn)
    np.testing.assert_array_equal(np.asarray(jfn(logits, labels, zero)), np.zeros(B))
    g = np.asarray(jax.jit(jax.grad(lambda x: fn(x, labels, zero).sum()))(jnp.asarray(logits)))
    assert np.all(np.isfinite(g)) and np.all(g == 0)
    if name in ("soft_dice", "dice_ce"):
        fn0 = functools.partial(fn, smooth=0.0)
        np.testing.assert_array_equal(np.asarray(fn0(logits, labels, zero)), np.zeros(B))
        g = np.asarray(jax.grad(lambda x: fn0(x, labels, zero).sum())(jnp.asarray(logits)))
        assert np.all(np.isfinite(g))
    if name == "generalised_jaccard":
        fn0 = functools.partial(fn, smooth=0.0)
        np.testing.assert_array_equal(np.asarray(fn0(logits, labels, zero)), np.zeros(B))
        g = np.asarray(jax.grad(lambda x: fn0(x, labels, zero).sum())(jnp.asarray(logits)))
        assert np.all(np.isfinite(g))


def test_batch_dice_with_masks_and_empty_sample():
    logits, labels = _rand(6)
    mask = np.random.default_rng(6).random(labels.shape) < 0.5
    mask[2] = False
    bd = np.asarray(soft_dice(logits, labels, mask, batch_dice=True))
    p = np_softmax(logits)
    ref = np_dice_one(p[mask], labels[mask], C)
    np.testing.assert_allclose(bd, np.full(B, ref), rtol=1e-5)


def test_jit_matches_eager():
    logits, labels = _rand(7)
    mask = np.random.default_rng(7).random(labels.shape) < 0.7
    for fn in ALL_LOSSES.values():
        np.testing.assert_allclose(
            np.asarray(jax.jit(fn)(logits, labels, mask)), np.asarray(fn(logits, labels, mask)), rtol=1e-5
        )


def test_dice_ce_gradient_finite_differences(x64):
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(2, 3, 3, 2, C))
    labels = rng.integers(0, C, size=(2, 3, 3, 2))
    mask = rng.random(labels.shape) < 0.7
    mask[0, 0, 0, 0] = True

    def f(x):
        return jnp.sum(dice_ce(x, labels, mask) * jnp.array([1.0, 0.7]))

    x = jnp.asarray(logits, jnp.float64)
    g = np.asarray(jax.grad(f)(x))
    assert g.dtype == np.float64
    eps = 1e-6
    idx = [(0, 0, 0, 0, 0), (0, 0, 0, 0, 2), (1, 2, 1, 1, 1), (0, 1, 2, 0, 1)]
    idx += [tuple(i) for i in np.argwhere(mask)[:3, :].tolist()]
    idx = [(*i, 1) if len(i) == 4 else i for i in idx]
    for i in idx:
        e = np.zeros_like(logits)
        e[i] = eps
        fd = (float(f(x + e)) - float(f(x - e))) / (2 * eps)
        np.testing.assert_allclose(g[i], fd, rtol=1e-6, atol=1e-9)
    # and at an unlabelled voxel both are 0
    j = tuple(np.argwhere(~mask)[0].tolist()) + (0,)
    e = np.zeros_like(logits)
    e[j] = eps
    assert g[j] == 0.0
    assert abs(float(f(x + e)) - float(f(x - e))) < 1e-12


# ----------------------------------------------------------------------------- deep supervision
def test_ds_weights():
    np.testing.assert_allclose(ds_weights(5), [0.5333, 0.2667, 0.1333, 0.0667, 0.0], atol=1e-3)
    np.testing.assert_allclose(ds_weights(5).sum(), 1.0)
    np.testing.assert_allclose(ds_weights(3, "neonatal"), [1.0, 0.5, 0.25])
    np.testing.assert_allclose(ds_weights(4, "neonatal"), [1.0, 0.5, 0.25, 0.125])
    np.testing.assert_allclose(ds_weights(1), [1.0])
    with pytest.raises(ValueError):
        ds_weights(3, "nope")


def _ds_inputs(seed, full=8):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, size=(B, full, full, full)).astype(np.int32)
    outputs = [
        rng.normal(size=(B, full // f, full // f, full // f, C)).astype(np.float32) for f in (1, 2, 4)
    ]
    mask = rng.random(labels.shape) < 0.5
    return outputs, labels, mask


def _np_nearest(x, f):
    """Independent nearest downsampling: first voxel of each f^3 block via reshape."""
    b, X, Y, Z = x.shape
    return x.reshape(b, X // f, f, Y // f, f, Z // f, f)[:, :, 0, :, 0, :, 0]


def test_deep_supervision_matches_manual_sum():
    outputs, labels, mask = _ds_inputs(9)
    w = np.array([0.6, 0.3, 0.1])
    got = np.asarray(deep_supervision_loss(dice_ce, outputs, labels, mask, weights=w))
    want = sum(
        w[i] * np.asarray(dice_ce(o, _np_nearest(labels, f), _np_nearest(mask, f)))
        for i, (o, f) in enumerate(zip(outputs, (1, 2, 4)))
    )
    assert got.shape == (B,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # default weights = nnU-Net's, last one zero
    got_d = np.asarray(deep_supervision_loss(dice_ce, outputs, labels, mask))
    wd = ds_weights(3)
    want_d = sum(
        wd[i] * np.asarray(dice_ce(o, _np_nearest(labels, f), _np_nearest(mask, f)))
        for i, (o, f) in enumerate(zip(outputs[:2], (1, 2)))
    )
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5)


def test_deep_supervision_ignores_unlabelled_voxels_at_every_resolution():
    outputs, labels, mask = _ds_inputs(10)
    w = np.array([0.5, 0.3, 0.2])
    loss = functools.partial(deep_supervision_loss, dice_ce, weights=w)
    ref = np.asarray(loss(outputs, labels, mask))
    rng = np.random.default_rng(11)
    new_outputs = []
    for o, f in zip(outputs, (1, 2, 4)):
        m = _np_nearest(mask, f)
        o2 = o.copy()
        o2[~m] = rng.normal(scale=10, size=o2[~m].shape)
        new_outputs.append(o2)
    new_labels = labels.copy()
    new_labels[~mask] = rng.integers(0, C, size=(~mask).sum())
    got = np.asarray(loss(new_outputs, new_labels, mask))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    # sanity: the perturbation does change the loss when there is no mask
    assert not np.allclose(np.asarray(loss(new_outputs, new_labels)), np.asarray(loss(outputs, labels)))


def test_deep_supervision_all_unlabelled_patch_is_zero():
    outputs, labels, mask = _ds_inputs(12)
    mask[0] = False
    for mode in ("downsample_targets", "upsample_outputs"):
        out = np.asarray(deep_supervision_loss(dice_ce, outputs, labels, mask, mode=mode))
        assert out[0] == 0.0 and np.all(out[1:] != 0)
        g = jax.grad(
            lambda os: deep_supervision_loss(dice_ce, os, labels, mask, mode=mode).sum()
        )([jnp.asarray(o) for o in outputs])
        for gi in g:
            gi = np.asarray(gi)
            assert np.all(np.isfinite(gi)) and np.all(gi[0] == 0)


def test_deep_supervision_skips_zero_weight_outputs():
    outputs, labels, mask = _ds_inputs(13)
    calls = []

    def recording(logits, lab, m):
        calls.append(logits.shape)
        return dice_ce(logits, lab, m)

    # a non-divisible last output would assert if it were evaluated
    bad = np.zeros((B, 3, 3, 3, C), np.float32)
    deep_supervision_loss(recording, outputs[:2] + [bad], labels, mask, weights=[0.7, 0.3, 0.0])
    assert calls == [outputs[0].shape, outputs[1].shape]
    with pytest.raises(AssertionError):
        deep_supervision_loss(recording, outputs[:2] + [bad], labels, mask, weights=[0.5, 0.3, 0.2])


def test_deep_supervision_upsample_outputs_shapes_and_values():
    outputs, labels, mask = _ds_inputs(14)
    calls = []

    def recording(logits, lab, m):
        calls.append((logits.shape, lab.shape, None if m is None else m.shape))
        return dice_ce(logits, lab, m)

    w = ds_weights(3, "neonatal")
    got = np.asarray(
        deep_supervision_loss(recording, outputs, labels, mask, weights=w, mode="upsample_outputs")
    )
    full = (B, 8, 8, 8)
    assert got.shape == (B,)
    assert calls == [((*full, C), full, full)] * 3
    want = sum(
        wi * np.asarray(dice_ce(jax.image.resize(o, (*full, C), "trilinear"), labels, mask))
        for wi, o in zip(w, outputs)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # jit
    jitted = jax.jit(
        lambda os, lab, m: deep_supervision_loss(dice_ce, os, lab, m, weights=w, mode="upsample_outputs")
    )
    np.testing.assert_allclose(np.asarray(jitted(outputs, labels, mask)), got, rtol=1e-5)


# ------------------------------------------------------- the neonatal reference code's loss (Richter & Fetit)
# MONAI DiceCELoss(to_onehot_y=False, sigmoid=True, squared_pred=True) on one-hot labels, DynUNet's deep
# supervision heads upsampled to full size with `interpolate` (nearest), weights 0.5^i unnormalised.
REFERENCE_LOSS = ["loss.dice_activation=sigmoid", "loss.dice_squared=true", "loss.dice_background=true",
                  "loss.ds_mode=upsample_outputs", "loss.ds_upsample=nearest", "loss.ds_weights=neonatal"]
VARIANT = {"activation": "sigmoid", "squared": True, "include_background": True}
NNUNET = {"activation": "softmax", "squared": False, "include_background": False}


def _np_reference_dice(logits, labels, mask=None, smooth=1e-5):
    """Per-sample mean over all classes of (2 sum p t + s) / (sum p^2 + sum t^2 + s), p = sigmoid, float64."""
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    t = np.eye(logits.shape[-1])[labels]
    w = np.ones(labels.shape) if mask is None else mask.astype(np.float64)
    w = w[..., None]
    axes = (1, 2, 3)
    inter = (p * t * w).sum(axes)
    den = (p * p * w).sum(axes) + (t * t * w).sum(axes)
    return ((2 * inter + smooth) / (den + smooth)).mean(-1)


def test_reference_dice_variant_against_numpy():
    logits, labels = _rand(21)
    mask = np.random.default_rng(22).random(labels.shape) < 0.6
    for m in (None, mask):
        got = np.asarray(soft_dice(logits, labels, m, **VARIANT))
        np.testing.assert_allclose(got, _np_reference_dice(logits, labels, m), rtol=1e-5)
    # each switch alone changes the value (the three are independent keys)
    base = np.asarray(soft_dice(logits, labels, mask, **VARIANT))
    for key in VARIANT:
        other = {**VARIANT, key: NNUNET[key]}
        assert not np.allclose(np.asarray(soft_dice(logits, labels, mask, **other)), base)
    with pytest.raises(ValueError, match="activation"):
        soft_dice(logits, labels, activation="tanh")


def test_reference_dice_variant_gradient_against_finite_differences(x64):
    logits, labels = _rand(23, shape=(2, 4, 4, 4))
    logits = logits.astype(np.float64)
    mask = np.random.default_rng(24).random(labels.shape) < 0.6
    g = np.asarray(jax.grad(lambda z: soft_dice(z, labels, mask, **VARIANT).sum())(jnp.asarray(logits)))
    rng = np.random.default_rng(25)
    eps = 1e-6
    for _ in range(12):
        j = tuple(int(rng.integers(0, n)) for n in logits.shape)
        e = np.zeros_like(logits)
        e[j] = eps
        fd = (_np_reference_dice(logits + e, labels, mask).sum()
              - _np_reference_dice(logits - e, labels, mask).sum()) / (2 * eps)
        np.testing.assert_allclose(g[j], fd, rtol=1e-5, atol=1e-10)


def test_reference_loss_matches_monai_dice_ce_with_dynunet_heads():
    """The whole reference loss through the config keys, value and gradient against MONAI / torch autograd."""
    torch = pytest.importorskip("torch")
    monai_losses = pytest.importorskip("monai.losses")
    from jaxseg.config import load_config
    from jaxseg.train.step import seg_losses

    cfg = load_config(None, REFERENCE_LOSS)
    outputs, labels, _ = _ds_inputs(26)
    outputs = outputs + [np.random.default_rng(27).normal(size=(B, 1, 1, 1, C)).astype(np.float32)]  # 4 heads
    got, grads = jax.value_and_grad(lambda os: seg_losses(cfg, os, labels).mean())(
        [jnp.asarray(o) for o in outputs])

    ref_fn = monai_losses.DiceCELoss(to_onehot_y=False, sigmoid=True, squared_pred=True)
    target = torch.from_numpy(np.moveaxis(np.eye(C, dtype=np.float32)[labels], -1, 1))
    ts = [torch.from_numpy(np.moveaxis(o, -1, 1).copy()).requires_grad_(True) for o in outputs]
    ref = sum(0.5 ** i * ref_fn(torch.nn.functional.interpolate(t, size=labels.shape[1:]), target)
              for i, t in enumerate(ts))
    ref.backward()
    # MONAI's DiceCELoss is CE + 1 - Dice: the same up to sum_i 0.5^i
    np.testing.assert_allclose(float(got) + sum(0.5 ** i for i in range(4)), float(ref.detach()), rtol=1e-5)
    for g, t in zip(grads, ts):
        np.testing.assert_allclose(np.asarray(g), np.moveaxis(t.grad.numpy(), 1, -1), rtol=1e-4, atol=1e-7)


def test_nearest_upsampled_outputs_repeat_each_voxel_and_sum_its_gradient():
    outputs, labels, mask = _ds_inputs(28)
    w = [0.0, 1.0, 0.0]  # the 2x output alone
    f = 2
    loss = functools.partial(deep_supervision_loss, dice_ce, weights=w, mode="upsample_outputs",
                             resize_method="nearest")
    up = np.repeat(np.repeat(np.repeat(outputs[1], f, 1), f, 2), f, 3)
    np.testing.assert_allclose(np.asarray(loss(outputs, labels, mask)),
                               np.asarray(dice_ce(up, labels, mask)), rtol=1e-6)
    g = jax.grad(lambda o: loss([outputs[0], o, outputs[2]], labels, mask).sum())(jnp.asarray(outputs[1]))
    g_full = np.asarray(jax.grad(lambda z: dice_ce(z, labels, mask).sum())(jnp.asarray(up)))
    b, X, Y, Z, c = g_full.shape
    want = g_full.reshape(b, X // f, f, Y // f, f, Z // f, f, c).sum(axis=(2, 4, 6))
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="resize_method"):
        deep_supervision_loss(dice_ce, outputs, labels, mode="upsample_outputs", resize_method="cubic")
