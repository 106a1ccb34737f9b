"""Sliding-window inference and whole-case prediction. Tiny volumes and hand-written apply
functions whose exact output is known; one tiny real U-Net for the plumbing."""

from __future__ import annotations

import csv
import itertools
import math

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from jaxseg.data.io import DataError
from jaxseg.inference import (
    average_apply_fns,
    ensemble_logits,
    gaussian_importance_map,
    make_apply_fn,
    mirror_subsets,
    pad_to_patch,
    predict_case,
    predict_folder,
    sliding_window_ensemble,
    sliding_window_logits,
    window_starts,
    window_steps,
)

PATCH = (8, 8, 8)


# --------------------------------------------------------------------------- Gaussian map


@pytest.mark.parametrize("patch", [(9, 13, 17), (8, 12, 16), (5, 6, 7)])
def test_gaussian_map_max_one_no_zeros_symmetric(patch):
    g = gaussian_importance_map(patch)
    assert g.shape == patch and g.dtype == np.float32
    assert g.max() == pytest.approx(1.0)
    assert g.min() > 0
    for ax in range(3):
        np.testing.assert_allclose(g, np.flip(g, ax), rtol=1e-6)
    # the maximum is at the centre voxel(s)
    centre = tuple((p - 1) // 2 for p in patch)
    assert g[centre] == pytest.approx(g.max())


def test_gaussian_map_sigma_is_patch_over_8():
    patch = (9, 17, 25)  # odd: a voxel sits exactly at the centre
    g = gaussian_importance_map(patch).astype(np.float64)
    c = [p // 2 for p in patch]
    assert g[tuple(c)] == 1.0
    for ax, p in enumerate(patch):
        sigma = p / 8
        d = np.arange(p) - c[ax]
        idx = list(c)
        idx[ax] = slice(None)
        np.testing.assert_allclose(g[tuple(idx)], np.exp(-d ** 2 / (2 * sigma ** 2)), rtol=1e-5)
    g2 = gaussian_importance_map(patch, sigma_scale=0.25).astype(np.float64)
    np.testing.assert_allclose(g2[c[0], c[1], :], np.exp(-(np.arange(25) - 12) ** 2 / (2 * (25 / 4) ** 2)),
                               rtol=1e-5)


def test_gaussian_map_zeros_replaced_by_smallest_nonzero():
    g = gaussian_importance_map((64, 8, 8), sigma_scale=1 / 64)  # sigma 1 voxel on axis 0: underflows
    assert g.min() > 0
    nz = np.unique(g)
    assert g[0, 0, 0] == nz[0]  # the corner got the smallest (formerly zero) value


def test_gaussian_map_nnunet_centre_matches_for_odd_and_is_offset_for_even():
    np.testing.assert_allclose(gaussian_importance_map((9, 11, 13), nnunet_centre=True),
                               gaussian_importance_map((9, 11, 13)), rtol=1e-5, atol=1e-7)
    g = gaussian_importance_map((8, 8, 8), nnunet_centre=True)
    assert np.unravel_index(np.argmax(g), g.shape) == (4, 4, 4)  # nnU-Net: delta at p // 2
    assert g.max() == pytest.approx(1.0) and g.min() > 0


# --------------------------------------------------------------------------- window starts


def test_window_steps_known_values():
    assert window_steps((20, 19, 8), (8, 8, 8), 0.5) == [[0, 4, 8, 12], [0, 4, 7, 11], [0]]
    assert window_steps((16, 16, 16), (8, 8, 8), 1.0) == [[0, 8]] * 3
    assert window_starts((8, 12, 8), (8, 8, 8)) == [(0, 0, 0), (0, 4, 0)]


@pytest.mark.parametrize("shape", [(20, 17, 8), (33, 9, 12), (8, 8, 8), (100, 21, 15)])
@pytest.mark.parametrize("step", [0.5, 0.25, 1.0, 0.33])
def test_window_starts_cover_first_last_and_step(shape, step):
    patch = (8, 8, 8)
    steps = window_steps(shape, patch, step)
    for size, p, s in zip(shape, patch, steps):
        assert s[0] == 0 and s[-1] == size - p
        diffs = np.diff(s)
        assert np.all(diffs > 0) if len(s) > 1 else True
        assert np.all(diffs <= math.ceil(p * step))
        # the fewest windows that reach the edge with the target step
        assert len(s) == 1 or (len(s) - 2) * p * step < size - p
    covered = np.zeros(shape, bool)
    starts = window_starts(shape, patch, step)
    assert len(starts) == np.prod([len(s) for s in steps])
    for x, y, z in starts:
        covered[x:x + 8, y:y + 8, z:z + 8] = True
    assert covered.all()


def test_window_starts_refuse_image_smaller_than_patch():
    with pytest.raises(ValueError, match="smaller than the patch"):
        window_starts((7, 20, 20), (8, 8, 8))
    with pytest.raises(ValueError, match="step"):
        window_starts((8, 8, 8), (8, 8, 8), step=0)


def test_pad_to_patch_symmetric():
    img = np.ones((5, 8, 10, 2), np.float32)
    out, pads = pad_to_patch(img, (8, 8, 8))
    assert out.shape == (8, 8, 10, 2) and pads == [(1, 2), (0, 0), (0, 0)]
    assert out[0].sum() == 0 and out[1:6].all() and out[6:].sum() == 0


# --------------------------------------------------------------------------- sliding window


def linear_fn(c=2, k=3, seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(c, k)).astype(np.float32))
    b = jnp.asarray(rng.normal(size=(k,)).astype(np.float32))
    return (lambda x: x @ w + b), np.asarray(w), np.asarray(b)


def window_max_fn(k=2):
    """A non-pointwise fn: every voxel of a window gets the window's maximum (channel 0), plus a
    ramp. (A max, unlike a mean, is exact whatever the batch size, so batching must not change
    the result by a single bit.)"""
    def fn(x):
        m = jnp.max(x[..., :1], axis=(1, 2, 3), keepdims=True)
        ramp = jnp.arange(x.shape[1], dtype=jnp.float32)[None, :, None, None, None]
        return jnp.concatenate([jnp.broadcast_to(m, x.shape[:4] + (1,)), m * ramp + x[..., :1]], -1)[..., :k]
    return fn


def rand_image(shape, c=2, seed=1):
    return np.random.default_rng(seed).normal(size=(*shape, c)).astype(np.float32)


@pytest.mark.parametrize("accumulate", ["host", "device"])
@pytest.mark.parametrize("shape", [(20, 18, 16), (5, 9, 3), (13, 11, 9), (8, 8, 8), (17, 4, 8)])
def test_pointwise_map_equals_full_image_map(shape, accumulate):
    fn, w, b = linear_fn()
    img = rand_image(shape)
    logits, extra = sliding_window_logits(fn, img, PATCH, 3, window_batch=3, accumulate=accumulate)
    assert logits.shape == (*shape, 3) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, img @ w + b, rtol=1e-5, atol=1e-5)
    assert extra["age"] is None
    assert extra["n_windows"] == len(window_starts(pad_to_patch(img, PATCH)[0].shape, PATCH))


@pytest.mark.parametrize("accumulate", ["host", "device"])
def test_gaussian_weighting_of_non_pointwise_windows(accumulate):
    """Each window outputs a constant (its maximum): the result is the Gaussian-weighted mean of
    the covering windows' constants, computed here by hand."""
    fn = window_max_fn(k=1)
    img = rand_image((14, 11, 8), c=1, seed=3)
    logits, _ = sliding_window_logits(fn, img, PATCH, 1, accumulate=accumulate, window_batch=4)
    g = gaussian_importance_map(PATCH).astype(np.float64)
    num = np.zeros(img.shape[:3])
    den = np.zeros(img.shape[:3])
    for x, y, z in window_starts(img.shape, PATCH):
        v = img[x:x + 8, y:y + 8, z:z + 8, 0].astype(np.float64).max()
        num[x:x + 8, y:y + 8, z:z + 8] += g * v
        den[x:x + 8, y:y + 8, z:z + 8] += g
    np.testing.assert_allclose(logits[..., 0], num / den, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("accumulate", ["host", "device"])
def test_window_batching_gives_identical_results(accumulate):
    fn = window_max_fn(k=2)
    img = rand_image((19, 13, 10), c=1, seed=4)  # 4 x 3 x 2 = 24 windows
    outs = [sliding_window_logits(fn, img, PATCH, 2, window_batch=wb, accumulate=accumulate)[0]
            for wb in (1, 3, 5, 100)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_host_and_device_accumulation_agree():
    fn = window_max_fn(k=2)
    img = rand_image((19, 13, 10), c=1, seed=5)
    a = sliding_window_logits(fn, img, PATCH, 2, accumulate="host")[0]
    b = sliding_window_logits(fn, img, PATCH, 2, accumulate="device")[0]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_mirror_subsets():
    assert mirror_subsets(()) == [()]
    assert mirror_subsets((0, 1, 2)) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    with pytest.raises(ValueError):
        mirror_subsets((3,))


def test_mirror_tta_pointwise_equals_no_tta():
    fn, _, _ = linear_fn()
    img = rand_image((13, 10, 9))
    plain = sliding_window_logits(fn, img, PATCH, 3)[0]
    tta = sliding_window_logits(fn, img, PATCH, 3, mirror_axes=(0, 1, 2))[0]
    np.testing.assert_allclose(tta, plain, rtol=1e-5, atol=1e-5)


def asym_fn(x):
    """Not mirror-symmetric: cumulative sums and a coordinate ramp (K = 3)."""
    ramp = jnp.arange(x.shape[3], dtype=jnp.float32)[None, None, None, :, None]
    return jnp.concatenate([jnp.cumsum(x, axis=1), jnp.cumsum(x, axis=2) * 0.5 + x, x * ramp], axis=-1)


@pytest.mark.parametrize("axes", [(0, 1, 2), (0, 2), (1,)])
def test_mirror_tta_equals_hand_computed_average(axes):
    img = rand_image(PATCH, c=1, seed=6)  # one window: the sliding window returns fn's output itself
    out, _ = sliding_window_logits(asym_fn, img, PATCH, 3, mirror_axes=axes)
    x = img[None]
    subsets = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    expected = np.zeros((*PATCH, 3), np.float64)
    for s in subsets:
        ax = tuple(a + 1 for a in s)
        expected += np.flip(np.asarray(asym_fn(jnp.asarray(np.flip(x, ax).copy()))), ax)[0]
    expected /= len(subsets)
    assert len(subsets) == 2 ** len(axes)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # and it differs from no TTA (the function is not symmetric)
    assert not np.allclose(out, sliding_window_logits(asym_fn, img, PATCH, 3)[0], atol=1e-3)


def test_mirror_tta_multi_window_equals_sliding_window_of_averaged_fn():
    img = rand_image((13, 10, 9), c=1, seed=7)
    axes = (0, 1)

    def manual(x):
        outs = []
        for s in mirror_subsets(axes):
            ax = tuple(a + 1 for a in s)
            outs.append(jnp.flip(asym_fn(jnp.flip(x, ax)), ax))
        return sum(outs) / len(outs)

    a = sliding_window_logits(asym_fn, img, PATCH, 3, mirror_axes=axes, window_batch=2)[0]
    b = sliding_window_logits(manual, img, PATCH, 3, window_batch=2)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def age_fn(offset=0.0):
    fn, _, _ = linear_fn()

    def f(x):
        return fn(x), jnp.mean(x, axis=(1, 2, 3, 4)) + offset
    return f


@pytest.mark.parametrize("accumulate", ["host", "device"])
def test_age_is_mean_of_window_ages(accumulate):
    img = rand_image((19, 12, 5), seed=8)  # padded to z = 8; 4 x 2 x 1 = 8 windows, batch 3 -> 1 dummy
    padded, _ = pad_to_patch(img, PATCH)
    ages = [padded[x:x + 8, y:y + 8, z:z + 8].mean() for x, y, z in window_starts(padded.shape, PATCH)]
    assert len(ages) == 8
    _, extra = sliding_window_logits(age_fn(), img, PATCH, 3, window_batch=3, accumulate=accumulate)
    assert extra["age"] == pytest.approx(float(np.mean(ages)), rel=1e-5, abs=1e-6)
    # mirror passes see the same window means
    _, extra = sliding_window_logits(age_fn(), img, PATCH, 3, window_batch=3, mirror_axes=(0, 2))
    assert extra["age"] == pytest.approx(float(np.mean(ages)), rel=1e-5, abs=1e-6)
    # ensemble members' ages are averaged
    _, extra = sliding_window_ensemble([age_fn(0.0), age_fn(2.0)], img, PATCH, 3, window_batch=3)
    assert extra["age"] == pytest.approx(float(np.mean(ages)) + 1.0, rel=1e-5, abs=1e-6)


def test_ensemble_is_mean():
    rng = np.random.default_rng(0)
    arrs = [rng.normal(size=(4, 5, 6, 3)).astype(np.float32) for _ in range(3)]
    np.testing.assert_allclose(ensemble_logits(arrs), np.mean(arrs, axis=0), rtol=1e-6)
    with pytest.raises(ValueError):
        ensemble_logits([arrs[0], arrs[0][:2]])
    fns = [linear_fn(seed=s)[0] for s in (0, 1)]
    img = rand_image((12, 9, 8), seed=9)
    each = [sliding_window_logits(f, img, PATCH, 3)[0] for f in fns]
    both, _ = sliding_window_ensemble(fns, img, PATCH, 3)
    np.testing.assert_allclose(both, ensemble_logits(each), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="age"):
        sliding_window_ensemble([fns[0], age_fn()], img, PATCH, 3)
    with pytest.raises(ValueError):
        average_apply_fns([])


def test_wrong_num_classes_is_a_clear_error():
    fn, _, _ = linear_fn()
    with pytest.raises(ValueError, match="num_classes=4"):
        sliding_window_logits(fn, rand_image((8, 8, 8)), PATCH, 4)


# --------------------------------------------------------------------------- predict_case


def oblique_affine():
    a, b = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([-1.1, 0.9, 1.3])  # also flipped along the first axis
    aff[:3, 3] = [30.0, -12.5, 7.25]
    return aff


AFFINES = {
    "LAS": np.array([[-1.2, 0, 0, 40.0], [0, 0.9, 0, -20.0], [0, 0, 1.5, 5.0], [0, 0, 0, 1]]),
    "oblique": oblique_affine(),
    "PSR_permuted": np.array([[0, 0, 1.0, 3.0], [-1.0, 0, 0, 9.0], [0, -1.2, 0, 1.0], [0, 0, 0, 1]]),
}


def make_case(tmp_path, name="sub01", shape=(14, 12, 10), affine="LAS", seed=0, n_channels=1, block=1):
    """Background 0 outside a box, levels 1 or 3 inside (in blocks of `block` voxels);
    returns (paths, raw level image, affine)."""
    rng = np.random.default_rng(seed)
    coarse = [-(-s // block) for s in shape]
    levels = rng.choice([1.0, 3.0], size=coarse)
    for ax, s in enumerate(shape):
        levels = np.repeat(levels, block, axis=ax)
    raw = np.zeros(shape, np.float32)
    box = (slice(2, shape[0] - 2), slice(1, shape[1] - 2), slice(2, shape[2] - 1))
    raw[box] = levels[:shape[0], :shape[1], :shape[2]][box]
    aff = AFFINES[affine] if isinstance(affine, str) else affine
    paths = []
    for c in range(n_channels):
        data = raw * (c + 1)  # every channel has the same nonzero mask
        p = tmp_path / f"{name}_{c:04d}.nii.gz"
        nib.save(nib.Nifti1Image(data, aff), str(p))
        paths.append(p)
    return paths, raw, aff


def threshold_fn(channel=0):
    """Class 0 where the normalised image is exactly 0 (background), 1 above the mean of the
    nonzero voxels, 2 below it: pointwise, so its sliding-window logits are exact."""
    def fn(x):
        v = x[..., channel:channel + 1]
        return jnp.concatenate([jnp.zeros_like(v), 10 * v, -10 * v], axis=-1)
    return fn


def expected_labels(raw):
    m = raw[raw != 0].mean()
    return np.where(raw == 0, 0, np.where(raw > m, 1, 2)).astype(np.uint8)


@pytest.mark.parametrize("orientation,probs", [("LAS", "nifti"), ("oblique", "npz"), ("PSR_permuted", None)])
def test_predict_case_round_trip_original_grid(tmp_path, orientation, probs):
    (tmp_path / "in").mkdir()
    paths, raw, aff = make_case(tmp_path / "in", affine=orientation)
    in_img = nib.load(str(paths[0]))
    out_dir = tmp_path / "out"
    out = out_dir / "sub01.nii.gz"
    pred = predict_case(threshold_fn(), paths, out, patch_size=PATCH, num_classes=3, window_batch=2,
                        save_probabilities=probs)
    assert pred.path == out and pred.age is None and pred.case_id == "sub01"
    img = nib.load(str(out))
    assert img.shape == raw.shape == in_img.shape
    np.testing.assert_array_equal(img.affine, in_img.affine)
    # the qform is recomputed (a quaternion) from the float32 sform: equal to float32 precision
    np.testing.assert_allclose(img.header.get_qform(), in_img.header.get_qform(), atol=1e-5)
    assert img.get_data_dtype() == np.uint8
    labels = np.asarray(img.dataobj)
    np.testing.assert_array_equal(labels, expected_labels(raw))
    expected_files = {"sub01.nii.gz"}
    if probs == "nifti":
        expected_files.add("sub01_probabilities.nii.gz")
        p = nib.load(str(pred.probabilities))
        assert p.shape == (*raw.shape, 3)
        np.testing.assert_array_equal(p.affine, in_img.affine)
        pd = np.asarray(p.dataobj)
        np.testing.assert_allclose(pd.sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(pd.argmax(-1), labels)
    elif probs == "npz":
        expected_files.add("sub01_probabilities.npz")
        with np.load(pred.probabilities) as z:
            pd = z["probabilities"]
            np.testing.assert_array_equal(z["affine"], in_img.affine)
        assert pd.shape == (*raw.shape, 3) and pd.dtype == np.float16
        np.testing.assert_array_equal(pd.astype(np.float32).argmax(-1), labels)
    # atomic writes: nothing but the outputs (no temporary files) in the output folder
    assert {p.name for p in out_dir.iterdir()} == expected_files


def test_predict_case_with_resampling_keeps_input_grid(tmp_path):
    (tmp_path / "in").mkdir()
    paths, raw, aff = make_case(tmp_path / "in", shape=(18, 16, 12), block=3, seed=2)
    in_img = nib.load(str(paths[0]))
    out = tmp_path / "out" / "sub01.nii.gz"
    predict_case(threshold_fn(), paths, out, patch_size=PATCH, num_classes=3, target_spacing=(1.0, 1.0, 1.0))
    img = nib.load(str(out))
    assert img.shape == in_img.shape
    np.testing.assert_array_equal(img.affine, in_img.affine)
    agree = (np.asarray(img.dataobj) == expected_labels(raw)).mean()
    assert agree > 0.95, agree  # logits are resampled back linearly; exact here in practice


def test_predict_case_with_real_tiny_unet(tmp_path):
    from jaxseg.models import UNet3D, plan_topology

    topo = plan_topology((16, 16, 16), (1.0, 1.0, 1.0), features_base=4, features_max=16)
    model = UNet3D(num_classes=3, topology=topo)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 16, 1)))
    fn = make_apply_fn(model, variables)
    logits, extra = sliding_window_logits(fn, rand_image((20, 16, 12), c=1), topo.patch_size, 3, window_batch=2)
    assert logits.shape == (20, 16, 12, 3) and np.isfinite(logits).all()
    assert extra["n_windows"] == 2 and extra["age"] is None
    # and through a whole case, as a 2-member "fold ensemble" sharing one compiled program
    (tmp_path / "in").mkdir()
    paths, raw, _ = make_case(tmp_path / "in", shape=(20, 16, 12))
    pred = predict_case([fn, make_apply_fn(model, variables)], paths, tmp_path / "p.nii", patch_size=(16, 16, 16),
                        num_classes=3, window_batch=2)
    out = nib.load(str(pred.path))
    assert out.shape == raw.shape and set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}


def test_predict_stored_case_and_inference_kwargs(tmp_path):
    from jaxseg import rundir
    from jaxseg.config import load_config
    from jaxseg.data import store
    from jaxseg.data.datasets import CaseRecord
    from jaxseg.data.prepare import prepare_case
    from jaxseg.inference import inference_kwargs, predict_stored_case

    (tmp_path / "in").mkdir()
    paths, raw, _ = make_case(tmp_path / "in", affine="oblique")
    prepare_case(CaseRecord("sub01", paths), tmp_path / "store", labels=None, channel_names=["T2w"],
                 target_spacing=None)
    store.write_dataset_meta(tmp_path / "store", {"channel_names": ["T2w"],
                                                  "preprocessing": {"target_spacing": [1.0, 1.0, 1.5]}})
    pred = predict_stored_case(threshold_fn(), tmp_path / "store", "sub01", tmp_path / "o.nii.gz",
                               patch_size=PATCH, num_classes=3)
    np.testing.assert_array_equal(np.asarray(nib.load(str(pred.path)).dataobj), expected_labels(raw))
    np.testing.assert_array_equal(nib.load(str(pred.path)).affine, nib.load(str(paths[0])).affine)

    cfg = load_config(None, ["data.patch_size=[16,16,16]", "data.num_classes=5", "eval.mirror_tta=true"])
    kw = inference_kwargs(cfg, preprocessing=rundir.preprocessing_from_store(tmp_path / "store"))
    assert kw["patch_size"] == (16, 16, 16) and kw["num_classes"] == 5 and kw["mirror_axes"] == (0, 1, 2)
    assert kw["target_spacing"] == (1.0, 1.0, 1.5) and kw["channel_names"] == ["T2w"]
    assert kw["step"] == 0.5 and kw["sigma_scale"] == 0.125 and kw["window_batch"] == 4


# --------------------------------------------------------------------------- predict_folder


def test_predict_folder_plain_folder_and_ages(tmp_path):
    src = tmp_path / "imagesTs"
    src.mkdir()
    raws = {}
    for i, name in enumerate(["caseA", "caseB"]):
        _, raws[name], _ = make_case(src, name=name, affine=["LAS", "oblique"][i], seed=i, n_channels=2)

    def fn(x):
        return threshold_fn(channel=1)(x), jnp.full((x.shape[0],), 40.0)

    preds = predict_folder(fn, src, tmp_path / "out", patch_size=PATCH, num_classes=3, num_channels=2,
                           progress=False)
    assert [p.case_id for p in preds] == ["caseA", "caseB"]
    for p in preds:
        assert p.path == tmp_path / "out" / f"{p.case_id}.nii.gz"
        assert p.age == pytest.approx(40.0)
        np.testing.assert_array_equal(np.asarray(nib.load(str(p.path)).dataobj), expected_labels(raws[p.case_id]))
    with open(tmp_path / "out" / "ages.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["caseA", "caseB"] and float(rows[0]["predicted_age"]) == 40.0
    assert sorted(q.name for q in (tmp_path / "out").iterdir()) == ["ages.csv", "caseA.nii.gz", "caseB.nii.gz"]
    # skip_existing keeps the written files
    again = predict_folder(fn, src, tmp_path / "out", patch_size=PATCH, num_classes=3, skip_existing=True,
                           progress=False)
    assert [p.path for p in again] == [p.path for p in preds]


def test_predict_folder_from_csv_manifest(tmp_path):
    (tmp_path / "imgs").mkdir()
    paths, raw, _ = make_case(tmp_path / "imgs", name="s1", affine="oblique")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"case,image_T2w\nsubj-1,imgs/{paths[0].name}\n")
    preds = predict_folder(threshold_fn(), manifest, tmp_path / "out", patch_size=PATCH, num_classes=3,
                           file_ending=".nii", progress=False)
    assert [p.path.name for p in preds] == ["subj-1.nii"]
    np.testing.assert_array_equal(np.asarray(nib.load(str(preds[0].path)).dataobj), expected_labels(raw))


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_data_error(tmp_path):
    (tmp_path / "in").mkdir()
    paths, _, _ = make_case(tmp_path / "in")
    kw = dict(patch_size=PATCH, num_classes=3)
    missing = tmp_path / "in" / "nope_0000.nii.gz"
    with pytest.raises(DataError, match="nope_0000.nii.gz: file not found"):
        predict_case(threshold_fn(), [missing], tmp_path / "o.nii.gz", **kw)
    with pytest.raises(DataError, match="expects 2"):
        predict_case(threshold_fn(), paths, tmp_path / "o.nii.gz", num_channels=2, **kw)
    with pytest.raises(DataError, match="refusing to overwrite"):
        predict_case(threshold_fn(), paths, paths[0], **kw)
    other = tmp_path / "in" / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4)), str(other))
    with pytest.raises(DataError, match="does not match"):
        predict_case(threshold_fn(), [paths[0], other], tmp_path / "o.nii.gz", **kw)
    # a plain folder with a channel missing for one case, and an empty folder
    (tmp_path / "in" / "other.nii.gz").unlink()
    make_case(tmp_path / "in", name="two", n_channels=2)
    with pytest.raises(DataError, match="'sub01' has channel files"):
        predict_folder(threshold_fn(), tmp_path / "in", tmp_path / "out", progress=False, **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .nii"):
        predict_folder(threshold_fn(), tmp_path / "empty", tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "o.nii.gz").exists()
