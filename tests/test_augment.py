"""On-device augmentation (nnU-Net; Kamraoui et al., DeepLesionBrain): exactness, alignment, IQDA, jit behaviour.

Tiny volumes (8^3 to 21^3, batch 2); every jitted function is built once per (params, shape)
through ``_jitted`` and shared by the tests, because XLA:CPU compile time dominates.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxseg.data import augment as A
from jaxseg.data.augment import PRESETS, AugmentParams, augment

NONE = AugmentParams()
# Geometry through the resampling path with every sampled value forced to identity.
GATHER_ID = AugmentParams(p_rotation=1.0, rotation_deg=((0.0, 0.0),) * 3,
                          p_scale=1.0, scale_range=(1.0, 1.0))
# Strong random geometry: rotation, scaling, a visible elastic field, mirroring.
GEOMETRIC = AugmentParams(p_rotation=1.0, rotation_deg=((-30.0, 30.0),) * 3,
                          p_scale=1.0, scale_range=(0.8, 1.25),
                          p_elastic=1.0, elastic_sigma=(3.0, 4.0),
                          elastic_magnitude=(300.0, 400.0), p_mirror=(0.5, 0.5, 0.5))
IN, OUT = (20, 20, 20), (16, 16, 16)
TRACES = {"geometric": 0}


@functools.lru_cache(maxsize=None)
def _jitted(params, out_shape=None, batch_mode="vmap"):
    return jax.jit(lambda k, x, y, m: augment(k, x, y, m, params, out_shape=out_shape,
                                              batch_mode=batch_mode))


def _geometric_fn(k, x, y, m):
    TRACES["geometric"] += 1  # runs only while tracing
    return augment(k, x, y, m, GEOMETRIC, out_shape=OUT)


GEOMETRIC_JIT = jax.jit(_geometric_fn)


def key(i):
    return jax.random.key(i)


def random_batch(shape=(2, 16, 16, 16), channels=3, seed=0, labels=(0, 1, 2, 3)):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape + (channels,)).astype(np.float32)
    label = rng.choice(np.asarray(labels, np.int32), size=shape)
    mask = (rng.random(shape) < 0.7).astype(np.float32)
    return jnp.asarray(image), jnp.asarray(label), jnp.asarray(mask)


def cube_batch(full_mask=False):
    """Label = an off-centre box; image channels = [label indicator, ones, mask indicator];
    mask = a slab along axis 2 (or everything)."""
    label = np.zeros((2,) + IN, np.int32)
    label[:, 4:14, 6:16, 7:13] = 1
    mask = np.zeros((2,) + IN, np.float32)
    if full_mask:
        mask[:] = 1
    else:
        mask[:, :, :, 3:12] = 1
    image = np.stack([label.astype(np.float32), np.ones_like(mask), mask], axis=-1)
    return jnp.asarray(image), jnp.asarray(label), jnp.asarray(mask)


# ------------------------------------------------------------------------------------------
# Parameters and presets
# ------------------------------------------------------------------------------------------

def test_params_are_static_and_validated():
    for p in PRESETS.values():
        hash(p)
    assert set(PRESETS) >= {"nnunet", "neonatal", "dlb_iqda", "none"}
    assert PRESETS["none"].is_identity and not PRESETS["nnunet"].is_identity
    n = PRESETS["nnunet"]
    assert (n.p_rotation, n.p_scale, n.scale_range) == (0.2, 0.2, (0.7, 1.4))
    assert (n.p_noise, n.noise_range, n.p_blur, n.blur_sigma) == (0.1, (0.0, 0.1), 0.2, (0.5, 1.0))
    assert n.noise_param == "std" and n.noise_shared_field  # nnU-Net's "noise_variance" is a std
    assert (n.p_blur_channel, n.blur_per_channel, n.p_lowres_channel, n.lowres_per_channel) == (0.5, True, 0.5, True)
    assert (n.p_brightness, n.p_contrast, n.p_lowres) == (0.15, 0.15, 0.25)
    assert (n.p_gamma_inverted, n.p_gamma, n.gamma_range) == (0.1, 0.3, (0.7, 1.5))
    assert n.p_mirror == (0.5, 0.5, 0.5) and n.rotation_deg == ((-30.0, 30.0),) * 3
    neo = PRESETS["neonatal"]
    assert neo.p_mirror == (0.1,) * 3 and neo.p_spatial == 0.24
    assert neo.rotation_deg == ((-5.0, 5.0), (-5.0, 5.0), (-180.0, 180.0))
    assert neo.noise_param == "std" and neo.noise_range == (0.0, 0.01)
    dlb = PRESETS["dlb_iqda"]
    assert dlb.iqda and dlb.needs_resampling is False and max(dlb.p_mirror) == 0
    # YAML lists become tuples (hashable); nonsense is refused.
    p = AugmentParams(p_mirror=[1, 0, 0], rotation_deg=[[0, 90], [0, 0], [0, 0]])
    assert p.p_mirror == (1.0, 0.0, 0.0) and hash(p) == hash(dataclasses.replace(p))
    with pytest.raises(ValueError):
        AugmentParams(p_noise=1.5)
    with pytest.raises(ValueError):
        AugmentParams(scale_range=(1.4, 0.7))
    with pytest.raises(ValueError):
        AugmentParams(noise_param="sd")


@pytest.mark.parametrize("name", ["nnunet", "neonatal", "dlb_iqda"])
def test_presets_run(name):
    image, label, mask = random_batch((2, 16, 16, 16), channels=2, labels=(0, 3, 7))
    fn = _jitted(PRESETS[name])
    for i in range(3):
        x, y, m = fn(key(i), image, label, mask)
        assert x.shape == image.shape and x.dtype == jnp.float32
        assert y.shape == label.shape and y.dtype == label.dtype and m.shape == mask.shape
        assert bool(jnp.isfinite(x).all())
        assert set(np.unique(np.asarray(y))) <= {0, 3, 7}
        assert set(np.unique(np.asarray(m))) <= {0.0, 1.0}


# ------------------------------------------------------------------------------------------
# Identity, cropping
# ------------------------------------------------------------------------------------------

def test_identity_parameters_give_exactly_the_input():
    image, label, mask = random_batch()
    for fn in (lambda *a: augment(*a, NONE), _jitted(NONE), _jitted(GATHER_ID)):
        x, y, m = fn(key(0), image, label, mask)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(image))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(label))
        np.testing.assert_array_equal(np.asarray(m), np.asarray(mask))


@pytest.mark.parametrize("n_in", [20, 21, 12])
def test_output_patch_is_the_centre_without_transforms(n_in):
    image, label, mask = random_batch((2, n_in, n_in, n_in))
    x, y, m = _jitted(NONE, OUT)(key(1), image, label, mask)
    assert x.shape == (2,) + OUT + (3,)
    o = (n_in - 16) // 2  # 2, 2, -2 (a smaller input is zero padded, unlabelled)
    ref = [np.zeros((2,) + OUT + a.shape[4:], a.dtype)
           for a in map(np.asarray, (image, label, mask))]
    src = slice(max(o, 0), max(o, 0) + min(16, n_in))
    dst = slice(max(-o, 0), max(-o, 0) + min(16, n_in))
    for r, a in zip(ref, (image, label, mask)):
        r[:, dst, dst, dst] = np.asarray(a)[:, src, src, src]
    for out, r in zip((x, y, m), ref):
        np.testing.assert_array_equal(np.asarray(out), r)
    if n_in == 20:  # the resampling path crops the same centre, exactly
        xg, yg, mg = _jitted(GATHER_ID, OUT)(key(1), image, label, mask)
        for out, r in zip((xg, yg, mg), ref):
            np.testing.assert_array_equal(np.asarray(out), r)


# ------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------

def test_cube_stays_aligned_under_random_geometry():
    image, label, mask = cube_batch()
    for i in range(4):
        x, y, m = GEOMETRIC_JIT(key(i), image, label, mask)
        x, y, m = map(np.asarray, (x, y, m))
        assert x.shape == (2,) + OUT + (3,)
        for b in range(2):
            agree = np.mean((x[b, ..., 0] > 0.5) == (y[b] == 1))
            assert agree >= 0.95, agree
            agree_mask = np.mean((x[b, ..., 2] > 0.5) == (m[b] == 1))
            assert agree_mask >= 0.95, agree_mask
            assert 0 < (y[b] == 1).sum() and 0 < m[b].sum() < m[b].size


def test_mask_is_zero_where_the_sample_fell_outside():
    image, label, mask = cube_batch(full_mask=True)
    n_outside = 0
    for i in range(4):
        x, y, m = map(np.asarray, GEOMETRIC_JIT(key(10 + i), image, label, mask))
        ones = x[..., 1]  # trilinear of an all-ones channel: < 1 near/outside the input border
        outside = m == 0  # the nearest sample fell outside the input (mask was 1 everywhere)
        n_outside += outside.sum()
        assert (ones[outside] <= 0.5 + 1e-6).all()
        assert (y[outside] == 0).all() and (x[..., 0][outside] <= 0.5 + 1e-6).all()
        assert (m[ones > 0.5 + 1e-6] == 1).all()
        assert (m[ones == 0] == 0).all()
    assert n_outside > 0  # rotations of a 20^3 region into a 16^3 patch do reach outside


def test_label_values_are_a_subset_and_samples_differ():
    image, label, mask = random_batch((2,) + IN, labels=(0, 2, 5))
    # the same sample twice: different per-sample keys must give different augmentations
    image, label, mask = (jnp.stack([a[0], a[0]]) for a in (image, label, mask))
    x, y, m = map(np.asarray, GEOMETRIC_JIT(key(3), image, label, mask))
    assert set(np.unique(y)) <= {0, 2, 5} and 5 in np.unique(y)
    assert set(np.unique(m)) <= {0.0, 1.0}
    assert not np.array_equal(x[0], x[1]) and not np.array_equal(y[0], y[1])


def test_jits_once_for_a_fixed_shape():
    image, label, mask = cube_batch()
    GEOMETRIC_JIT(key(0), image, label, mask)
    n = TRACES["geometric"]
    outs = [np.asarray(GEOMETRIC_JIT(key(100 + i), image, label, mask)[0]) for i in range(3)]
    assert TRACES["geometric"] == n == 1
    assert not np.array_equal(outs[0], outs[1])  # new keys, new augmentations, no retrace


def test_vmap_and_map_batch_modes_agree():
    image, label, mask = cube_batch()
    a = GEOMETRIC_JIT(key(5), image, label, mask)
    b = _jitted(GEOMETRIC, OUT, "map")(key(5), image, label, mask)
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), atol=1e-5)
    assert np.mean(np.asarray(a[1]) == np.asarray(b[1])) > 0.999


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flip_one_axis(axis):
    image, label, mask = random_batch()
    p = [0.0, 0.0, 0.0]
    p[axis] = 1.0
    fn = _jitted(AugmentParams(p_mirror=tuple(p)))
    x, y, m = fn(key(0), image, label, mask)
    for out, ref in zip((x, y, m), (image, label, mask)):
        np.testing.assert_array_equal(np.asarray(out), np.flip(np.asarray(ref), axis + 1))
    x2, y2, m2 = fn(key(1), x, y, m)  # flipping twice is the identity
    for out, ref in zip((x2, y2, m2), (image, label, mask)):
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_random_flips_preserve_class_volumes():
    image, label, mask = random_batch(labels=(0, 1, 2, 3, 4))
    fn = _jitted(AugmentParams(p_mirror=(0.5, 0.5, 0.5)))
    counts = [np.bincount(np.asarray(label[b]).ravel(), minlength=5) for b in range(2)]
    seen = set()
    for i in range(4):
        x, y, m = fn(key(i), image, label, mask)
        for b in range(2):
            np.testing.assert_array_equal(np.bincount(np.asarray(y[b]).ravel(), minlength=5),
                                          counts[b])
            assert float(m[b].sum()) == float(mask[b].sum())
            seen.add(np.asarray(y[b]).tobytes())
    assert len(seen) > 2
    # Mirroring folded into the resampling grid is exact too.
    flip_all = dataclasses.replace(GATHER_ID, p_mirror=(1.0, 1.0, 1.0))
    x, y, m = _jitted(flip_all)(key(0), image, label, mask)
    np.testing.assert_array_equal(np.asarray(y), np.flip(np.asarray(label), (1, 2, 3)))
    np.testing.assert_array_equal(np.asarray(x), np.flip(np.asarray(image), (1, 2, 3)))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rotation_by_90_degrees_is_rot90(axis):
    image, label, mask = random_batch(labels=(0, 1, 2, 3, 4, 5))
    deg = [(0.0, 0.0)] * 3
    deg[axis] = (90.0, 90.0)
    x, y, m = _jitted(AugmentParams(p_rotation=1.0, rotation_deg=tuple(deg)))(
        key(0), image, label, mask)
    # Documented convention: +90 deg about axis a = rot90(k=-1) in the plane (a+1, a+2) mod 3.
    plane = (1 + (axis + 1) % 3, 1 + (axis + 2) % 3)
    np.testing.assert_array_equal(np.asarray(y), np.rot90(np.asarray(label), -1, plane))
    np.testing.assert_array_equal(np.asarray(m), np.rot90(np.asarray(mask), -1, plane))
    np.testing.assert_allclose(np.asarray(x), np.rot90(np.asarray(image), -1, plane), atol=1e-4)


def test_resample_matches_map_coordinates():
    image, label, mask = random_batch((1, 10, 10, 10), channels=1)
    rng = np.random.default_rng(1)
    coords = [jnp.asarray(rng.uniform(-2, 12, (6, 7, 8)).astype(np.float32)) for _ in range(3)]
    x, y, m = jax.jit(A.resample)(image[0], label[0], mask[0], coords)
    ref = jax.scipy.ndimage.map_coordinates(image[0, ..., 0], coords, order=1, mode="constant")
    np.testing.assert_allclose(np.asarray(x[..., 0]), np.asarray(ref), atol=1e-5)
    # nearest: round-half-up vs round-half-even only differ exactly at .5: none here
    ref_y = jax.scipy.ndimage.map_coordinates(label[0], coords, order=0, mode="constant")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref_y))


def test_elastic_magnitude_matches_the_batchgenerators_definition():
    # d = magnitude * gaussian_filter(U(-1, 1), sigma, mode="constant") per component, in voxels
    params = dataclasses.replace(GEOMETRIC, elastic_sigma=(5.0, 8.0))
    n, sigma, mag = 32, 5.0, 60.0
    fields = jax.jit(jax.vmap(lambda k: A.elastic_displacement(k, (n, n, n), sigma, mag, params)))(
        jax.random.split(key(0), 4))
    rng = np.random.default_rng(0)
    ref = [mag * ndi.gaussian_filter(rng.uniform(-1, 1, (n, n, n)), sigma, mode="constant",
                                     truncate=3.0) for _ in range(12)]
    centre = slice(8, 24)
    rms = float(np.sqrt(np.mean(np.asarray(fields)[:, :, centre, centre, centre] ** 2)))
    rms_ref = float(np.sqrt(np.mean(np.stack(ref)[:, centre, centre, centre] ** 2)))
    assert 0.75 < rms / rms_ref < 1.33, (rms, rms_ref)
    assert 0.1 < rms < 2.0  # sub-voxel to voxel displacements, as in batchgenerators / MONAI


# ------------------------------------------------------------------------------------------
# Intensity and IQDA
# ------------------------------------------------------------------------------------------

@jax.jit
def _blur(x, sigma):
    return A.gaussian_blur(x, sigma, sigma_max=1.75)


@jax.jit
def _axial(x, size):
    return A.axial_mean_filter(x, size, max_size=4, axis=2)


def np_axial_mean(x, size, axis):
    """numpy reference: window x[i - size//2 : i - size//2 + size], reflect at the borders."""
    before, after = size // 2, size - 1 - size // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (before, after)
    xp = np.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    return sum(np.take(xp, np.arange(t, t + n), axis=axis) for t in range(size)) / size


def test_gaussian_blur_matches_scipy():
    x = np.random.default_rng(0).normal(size=(12, 10, 9, 2)).astype(np.float32)
    for sigma in (0.5, 1.0, 1.75):
        out = np.asarray(_blur(jnp.asarray(x), sigma))
        ref = ndi.gaussian_filter(x, (sigma, sigma, sigma, 0), mode="reflect", truncate=3.0)
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_axial_mean_filter_matches_numpy():
    x = np.random.default_rng(1).normal(size=(6, 5, 11, 2)).astype(np.float32)
    for size in (2, 3, 4):
        out = np.asarray(_axial(jnp.asarray(x), size))
        np.testing.assert_allclose(out, np_axial_mean(x, size, 2), atol=1e-5)
        np.testing.assert_allclose(out, ndi.uniform_filter1d(x, size, axis=2, mode="reflect"),
                                   atol=1e-5)


def _iqda_only(weights, **kw):
    return _jitted(AugmentParams(iqda=True, iqda_weights=weights, **kw))


def test_iqda_blur_reduces_variance():
    image, label, mask = random_batch(channels=2)
    x, y, m = _iqda_only((1.0, 0.0, 0.0))(key(0), image, label, mask)
    assert (np.asarray(x).var(axis=(1, 2, 3)) < 0.9 * np.asarray(image).var(axis=(1, 2, 3))).all()
    np.testing.assert_array_equal(np.asarray(y), np.asarray(label))  # labels unchanged
    np.testing.assert_array_equal(np.asarray(m), np.asarray(mask))


def test_iqda_unsharp_masking_is_the_formula():
    image, label, mask = random_batch(channels=2)
    x, _, _ = _iqda_only((0.0, 1.0, 0.0), iqda_sigma=(1.0, 1.0), iqda_alpha=(2.5, 2.5))(
        key(0), image, label, mask)
    blurred = np.stack([np.asarray(A.gaussian_blur(image[b], 1.0, 1.0)) for b in range(2)])
    ref = np.asarray(image) + 2.5 * (np.asarray(image) - blurred)
    np.testing.assert_allclose(np.asarray(x), ref, atol=1e-4)
    # and the blur itself is scipy's Gaussian
    sp = ndi.gaussian_filter(np.asarray(image), (0, 1, 1, 1, 0), mode="reflect", truncate=3.0)
    np.testing.assert_allclose(blurred, sp, atol=1e-5)


def test_iqda_axial_subsampling_is_a_mean_filter():
    image, label, mask = random_batch(channels=1)
    x, _, _ = _iqda_only((0.0, 0.0, 1.0))(key(0), image, label, mask)
    x = np.asarray(x)
    img = np.asarray(image)
    for b in range(2):  # each sample got one of sz in {2, 3, 4}, along the last spatial axis
        errs = [np.abs(x[b] - np_axial_mean(img[b], s, 2)).max() for s in (2, 3, 4)]
        assert min(errs) < 1e-5, errs


def test_iqda_reference_code_preset_sometimes_does_nothing():
    # same shapes as test_presets_run: the dlb_iqda program is compiled once for both
    image, label, mask = random_batch((2, 16, 16, 16), channels=2, labels=(0, 3, 7))
    fn = _jitted(PRESETS["dlb_iqda_code"])
    n_same = 0
    for i in range(30):
        x = np.asarray(fn(key(i), image, label, mask)[0])
        n_same += sum(np.array_equal(x[b], np.asarray(image[b])) for b in range(2))
    assert 1 <= n_same <= 15  # p(none) = 0.1 of 60 samples
    x = np.asarray(_jitted(PRESETS["dlb_iqda"])(key(0), image, label, mask)[0])
    assert not any(np.array_equal(x[b], np.asarray(image[b])) for b in range(2))


@pytest.mark.parametrize("inverted", [False, True])
def test_gamma_keeps_the_image_range(inverted):
    image, label, mask = random_batch(channels=2)
    p = AugmentParams(p_gamma=0.0 if inverted else 1.0, p_gamma_inverted=1.0 if inverted else 0.0,
                      gamma_retain_stats=False)
    x = np.asarray(_jitted(p)(key(2), image, label, mask)[0])
    img = np.asarray(image)
    np.testing.assert_allclose(x.min(axis=(1, 2, 3)), img.min(axis=(1, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(x.max(axis=(1, 2, 3)), img.max(axis=(1, 2, 3)), atol=1e-5)
    assert not np.allclose(x, img, atol=1e-3)


def test_gamma_retain_stats_keeps_mean_and_std():
    image, _, _ = random_batch(channels=2)
    img = np.asarray(image[0])
    out = np.asarray(A.gamma_transform(image[0], jnp.array([0.7, 1.5]), retain_stats=True))
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), img.mean(axis=(0, 1, 2)), atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), img.std(axis=(0, 1, 2)), rtol=1e-3)


def test_contrast_and_low_resolution():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(10, 12, 9, 1)).astype(np.float32))
    c = np.asarray(A.contrast_transform(x, jnp.array([0.5])))
    np.testing.assert_allclose(c.mean(), float(x.mean()), atol=1e-5)  # no clipping at 0.5
    hi = np.asarray(A.contrast_transform(x, jnp.array([2.0])))
    assert hi.min() >= float(x.min()) - 1e-6 and hi.max() <= float(x.max()) + 1e-6
    lowres = jax.jit(A.simulate_low_resolution)
    # zoom 1 is the identity (to float32 rounding: the resampling matrix is applied by a dot)
    np.testing.assert_allclose(np.asarray(lowres(x, 1.0)), np.asarray(x), rtol=1e-5, atol=1e-6)
    # zoom 0.5: nearest-exact down to 5x6x4 (round(4.5) = 4), linear (half-pixel) back up
    ref = np.asarray(x)
    for axis, n in enumerate(ref.shape[:3]):
        m = int(np.round(n * 0.5))
        src = np.minimum(np.floor((np.arange(m) + 0.5) * n / m), n - 1).astype(int)
        down = np.take(ref, src, axis)
        u = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0, m - 1)
        k0 = np.floor(u).astype(int)
        k1 = np.minimum(k0 + 1, m - 1)
        w = (u - k0).reshape([-1 if a == axis else 1 for a in range(4)])
        ref = np.take(down, k0, axis) * (1 - w) + np.take(down, k1, axis) * w
    np.testing.assert_allclose(np.asarray(lowres(x, 0.5)), ref, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Fidelity to nnU-Net v2 (nnUNetTrainer.get_training_transforms, batchgeneratorsv2) and MONAI
# ------------------------------------------------------------------------------------------

N_KEYS = 4000  # binomial sd at p = 0.5 is 0.008: the 0.04 tolerances below are 5 sd, and seeds are fixed


@functools.lru_cache(maxsize=None)
def _draws(params, n_ch, n=N_KEYS, seed=0):
    fn = jax.jit(jax.vmap(lambda k: A.intensity_draws(A._Draws(k), n_ch, params)))
    return {k: np.asarray(v) for k, v in fn(jax.random.split(key(seed), n)).items()}


def test_nnunet_intensity_draws_match_nnunet():
    d = _draws(PRESETS["nnunet"], 4)
    for name, p in (("noise", 0.1), ("blur", 0.2), ("brightness", 0.15), ("contrast", 0.15),
                    ("lowres", 0.25), ("gamma_inverted", 0.1), ("gamma", 0.3)):
        assert abs(d[f"{name}_on"].mean() - p) < 0.025, name
    # GaussianNoiseTransform: one std ~ U(0, 0.1) for all channels
    assert d["noise_std"].shape == (N_KEYS,) and 0 <= d["noise_std"].min() and d["noise_std"].max() <= 0.1
    assert abs(d["noise_std"].mean() - 0.05) < 0.003
    # blur and low-res: each channel independently with p 0.5, its own sigmas per axis / own zoom
    for name in ("blur", "lowres"):
        ch = d[f"{name}_channels"]
        assert ch.shape == (N_KEYS, 4) and np.all(np.abs(ch.mean(axis=0) - 0.5) < 0.04), name
        assert abs((ch[:, 0] & ch[:, 1]).mean() - 0.25) < 0.04, name
    sig = d["blur_sigma"]
    assert sig.shape == (N_KEYS, 4, 3) and sig.min() >= 0.5 and sig.max() <= 1.0
    assert abs(sig.mean() - 0.75) < 0.01
    assert np.all(sig[:, 0, 0] != sig[:, 1, 0]) and np.all(sig[:, 0, 0] != sig[:, 0, 1])
    zoom = d["lowres_zoom"]
    assert zoom.shape == (N_KEYS, 4) and zoom.min() >= 0.5 and zoom.max() <= 1.0
    assert abs(zoom.mean() - 0.75) < 0.01 and np.all(zoom[:, 0] != zoom[:, 1])
    # brightness, contrast, gamma: own factor per channel (synchronize_channels=False)
    for name, (lo, hi) in (("brightness", (0.75, 1.25)), ("contrast", (0.75, 1.25)), ("gamma", (0.7, 1.5))):
        f = d[name]
        assert f.min() >= lo and f.max() <= hi and np.all(f[:, 0] != f[:, 1]), name
        assert abs((f < 1).mean() - 0.5) < 0.04, name  # BGContrast: half the draws below 1


def test_neonatal_scale_intensity_is_one_factor_for_all_channels():
    d = _draws(PRESETS["neonatal"], 3)
    f = d["brightness"]
    assert np.all(f == f[:, :1]) and f.min() >= 0.9 and f.max() <= 1.1
    assert abs(f.mean() - 1.0) < 0.003 and abs(d["brightness_on"].mean() - 0.24) < 0.025
    # RandGaussianSmooth / RandGaussianNoise: every channel, shared sigmas; noise std U(0, 0.01)
    assert np.all(d["blur_channels"]) and np.all(d["blur_sigma"] == d["blur_sigma"][:, :1])
    assert d["noise_std"].max() <= 0.01 and abs(d["noise_std"].mean() - 0.005) < 0.0003


NOISE_ONLY = AugmentParams(**{f: getattr(PRESETS["nnunet"], f)
                              for f in ("noise_range", "noise_param", "noise_shared_field")}, p_noise=1.0)


def test_nnunet_noise_is_a_std():
    """Zero images: every sample is std * N(0, 1) with std ~ U(0, 0.1), the same field in every
    channel (np.random.normal(0, sigma) expanded over the channels)."""
    zeros = jnp.zeros((128, 8, 8, 8, 2), jnp.float32)
    label = jnp.zeros(zeros.shape[:4], jnp.int32)
    x, _, _ = _jitted(NOISE_ONLY)(key(5), zeros, label, jnp.ones(label.shape))
    x = np.asarray(x)
    np.testing.assert_array_equal(x[..., 0], x[..., 1])
    per_sample = x[..., 0].reshape(128, -1).std(axis=1)
    assert per_sample.max() < 0.1 * 1.15  # 512 voxels: the estimate is within ~3 % of the std
    assert abs(per_sample.mean() - 0.05) < 0.008  # E[U(0, 0.1)] (sd of this mean ~0.0026)
    # overall RMS sqrt(E[std^2]) = 0.1 / sqrt(3); reading the value as a variance gave ~0.22
    assert abs(np.sqrt(np.mean(x ** 2)) - 0.1 / np.sqrt(3)) < 0.006


def _only(names, **extra):
    n = PRESETS["nnunet"]
    return AugmentParams(**{f: getattr(n, f) for f in names}, **extra)


BLUR_ONLY = _only(("blur_sigma", "p_blur_channel", "blur_per_channel"), p_blur=1.0)
LOWRES_ONLY = _only(("lowres_zoom", "p_lowres_channel", "lowres_per_channel"), p_lowres=1.0)


@pytest.mark.parametrize("which", ["blur", "lowres"])
def test_per_channel_blur_and_lowres_apply_the_drawn_parameters(which):
    params = BLUR_ONLY if which == "blur" else LOWRES_ONLY
    image, label, mask = random_batch((2, 8, 9, 10), channels=4, seed=7)
    fn = _jitted(params)
    seen = set()
    for i in range(4):
        x, _, _ = fn(key(i), image, label, mask)
        for b, k in enumerate(jax.random.split(key(i), 2)):
            d = A.intensity_draws(A._Draws(jax.random.split(k, 3)[0]), 4, params)
            for c in range(4):
                src, out = np.asarray(image[b, ..., c]), np.asarray(x[b, ..., c])
                if not bool(d[f"{which}_channels"][c]):
                    np.testing.assert_array_equal(out, src)
                elif which == "blur":
                    want = ndi.gaussian_filter(src, np.asarray(d["blur_sigma"][c]), mode="reflect", truncate=3.0)
                    np.testing.assert_allclose(out, want, atol=1e-5)
                else:
                    want = np.asarray(A.simulate_low_resolution(image[b, ..., c:c + 1], d["lowres_zoom"][c]))
                    np.testing.assert_allclose(out, want[..., 0], atol=1e-5)
                seen.add(bool(d[f"{which}_channels"][c]))
    assert seen == {True, False}


def test_dummy_2d_rule():
    n = PRESETS["nnunet"]
    assert A.for_patch(n, (16, 64, 64)).dummy_2d_axis == 0
    assert A.for_patch(n, (64, 80, 20)).dummy_2d_axis == 2
    assert A.for_patch(n, (16, 48, 48)) is n  # ratio 3 is not > 3
    assert A.for_patch(n, (64, 64, 64)) is n
    assert A.for_patch(PRESETS["neonatal"], (16, 64, 64)) is PRESETS["neonatal"]
    p = A.for_patch(n, (16, 64, 64))
    assert p.rotation_deg == ((-180.0, 180.0), (0.0, 0.0), (0.0, 0.0)) and p.p_scale == 0.2


def test_dummy_2d_rotates_and_scales_in_plane_only():
    params = AugmentParams(p_rotation=1.0, rotation_deg=((-180.0, 180.0),) * 3, p_scale=1.0,
                           scale_range=(0.7, 1.4), dummy_2d_axis=2)
    flips = [jnp.array(False)] * 3
    fn = jax.jit(lambda k: A.sampling_coordinates(A._Draws(k), k, (12, 12, 8), (8, 8, 4), params, flips))
    moved = 0.0
    for i in range(8):
        coords = [np.asarray(c) for c in fn(key(i))]
        # the out-of-plane axis keeps its grid exactly: voxel index + the centre-crop offset
        np.testing.assert_array_equal(coords[2], np.broadcast_to(np.arange(4.0) + 2, (8, 8, 4)))
        moved += np.abs(coords[0] - (np.arange(8.0)[:, None, None] + 2)).max()
    assert moved > 1.0  # the in-plane axes do rotate / scale


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_takes_eight_channels(name):
    image, label, mask = random_batch((1, 8, 8, 8), channels=8, seed=2)
    x, y, m = _jitted(PRESETS[name])(key(3), image, label, mask)
    assert x.shape == image.shape and bool(jnp.isfinite(x).all())
