"""Metrics vs independent computations: brute-force distances, BFS components, hand numbers."""

from __future__ import annotations

import itertools
import math
from collections import deque

import numpy as np
import pytest

from jaxseg.evaluation import metrics as M

ANISO = (1.0, 2.0, 3.5)


# --------------------------------------------------------------------------- independent references


def bf_surface_coords(mask: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour that is background or outside the array, by explicit loop."""
    out = []
    for idx in zip(*np.nonzero(mask)):
        for ax, step in itertools.product(range(3), (-1, 1)):
            n = list(idx)
            n[ax] += step
            if not 0 <= n[ax] < mask.shape[ax] or not mask[tuple(n)]:
                out.append(idx)
                break
    return np.array(out, dtype=np.float64).reshape(-1, 3)


def bf_directed(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """All-pairs O(n^2) nearest-surface distances in mm, both directions."""
    sa = bf_surface_coords(a) * np.asarray(spacing)
    sb = bf_surface_coords(b) * np.asarray(spacing)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return d.min(1), d.min(0)


def bf_components(mask: np.ndarray) -> list[set[tuple[int, int, int]]]:
    """BFS flood fill with the 18-neighbourhood (face + edge neighbours, no corners)."""
    offs = [o for o in itertools.product((-1, 0, 1), repeat=3) if 1 <= sum(map(abs, o)) <= 2]
    assert len(offs) == 18
    seen: set = set()
    comps = []
    for start in zip(*np.nonzero(mask)):
        if start in seen:
            continue
        comp, queue = {start}, deque([start])
        seen.add(start)
        while queue:
            v = queue.popleft()
            for o in offs:
                n = tuple(int(v[i] + o[i]) for i in range(3))
                if all(0 <= n[i] < mask.shape[i] for i in range(3)) and mask[n] and n not in seen:
                    seen.add(n)
                    comp.add(n)
                    queue.append(n)
        comps.append(comp)
    return comps


def bf_lesion_rates(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    rc, pc = bf_components(ref), bf_components(pred)
    detected = sum(any(pred[v] for v in c) for c in rc)
    false_pos = sum(not any(ref[v] for v in c) for c in pc)
    return (detected / len(rc) if rc else math.nan, false_pos / len(pc) if pc else math.nan)


def blob(rng: np.random.Generator, shape=(12, 12, 12), p: float = 0.35) -> np.ndarray:
    """Irregular random mask that touches the array border (exercises the crop + border rule)."""
    return rng.random(shape) < p


# --------------------------------------------------------------------------- Dice / IoU / PPV / TPR


def test_dice_iou_hand_computed():
    pred = np.zeros((4, 4, 4), int)
    ref = np.zeros((4, 4, 4), int)
    pred[0, 0, :3] = 1  # 3 voxels
    ref[0, 0, 1:] = 1  # 3 voxels, overlap 2
    assert M.dice(pred, ref) == pytest.approx(2 * 2 / 6)
    assert M.iou(pred, ref) == pytest.approx(2 / 4)
    assert M.ppv(pred, ref) == pytest.approx(2 / 3)
    ref[1, 1, 1] = 1  # ref now 4 voxels: TPR changes, PPV does not
    assert M.tpr(pred, ref) == pytest.approx(2 / 4)
    assert M.ppv(pred, ref) == pytest.approx(2 / 3)


def test_per_class_and_nan_rule():
    pred = np.zeros((5, 5, 5), np.int16)
    ref = np.zeros((5, 5, 5), np.int16)
    pred[0, :2, 0] = 1  # class 1: pred 2, ref 2, overlap 1
    ref[0, 1:3, 0] = 1
    pred[4, 4, 4] = 2  # class 2: pred only -> 0
    ref[3, 3, 3] = 3  # class 3: ref only -> 0
    # class 4: absent from both -> NaN (nnU-Net), not 1 and not 0
    d = M.dice_per_class(pred, ref, [1, 2, 3, 4])
    j = M.iou_per_class(pred, ref, [1, 2, 3, 4])
    assert set(d) == {1, 2, 3, 4}
    assert d[1] == pytest.approx(0.5) and j[1] == pytest.approx(1 / 3)
    assert d[2] == 0.0 and d[3] == 0.0 and j[2] == 0.0 and j[3] == 0.0
    assert math.isnan(d[4]) and math.isnan(j[4])


def test_dice_matches_set_formula_random():
    rng = np.random.default_rng(0)
    pred, ref = rng.integers(0, 4, (10, 10, 10)), rng.integers(0, 4, (10, 10, 10))
    got = M.dice_per_class(pred, ref, range(4))
    for l in range(4):
        a = {tuple(v) for v in np.argwhere(pred == l)}
        b = {tuple(v) for v in np.argwhere(ref == l)}
        assert got[l] == pytest.approx(2 * len(a & b) / (len(a) + len(b)))


def test_ppv_tpr_empty():
    z = np.zeros((3, 3, 3), bool)
    one = z.copy()
    one[1, 1, 1] = True
    # an empty prediction scores PPV 0 by default (ISBI 2015), NaN under the "nan" convention
    assert M.ppv(z, one) == 0.0 and M.ppv(z, z) == 0.0 and M.tpr(z, one) == 0.0
    assert math.isnan(M.ppv(z, one, "nan")) and math.isnan(M.ppv(z, z, empty_pred="nan"))
    assert math.isnan(M.tpr(one, z)) and M.ppv(one, z) == 0.0 and M.ppv(one, z, "nan") == 0.0
    with pytest.raises(ValueError, match="empty_pred"):
        M.ppv(z, one, "zeros")


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        M.dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))


# --------------------------------------------------------------------------- surface distances


def test_surface_is_face_boundary():
    m = np.zeros((7, 7, 7), bool)
    m[1:6, 1:6, 1:6] = True  # 5^3 cube: 125 - 3^3 interior = 98 surface voxels
    assert M.surface(m).sum() == 98
    full = np.ones((3, 3, 3), bool)  # only the centre has all 6 face neighbours inside
    assert M.surface(full).sum() == 26


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), ANISO])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_directed_distances_match_brute_force(seed, spacing):
    rng = np.random.default_rng(seed)
    pred, ref = blob(rng), blob(rng)
    d_pr, d_rp = M.surface_distances(pred, ref, spacing)
    b_pr, b_rp = bf_directed(pred, ref, spacing)
    # Same voxel order (C order of nonzero) in both implementations.
    np.testing.assert_allclose(d_pr, b_pr, rtol=1e-12)
    np.testing.assert_allclose(d_rp, b_rp, rtol=1e-12)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), ANISO])
@pytest.mark.parametrize("seed", [3, 4])
def test_hd95_msd_match_brute_force(seed, spacing):
    rng = np.random.default_rng(seed)
    pred = np.zeros((14, 14, 14), bool)
    ref = np.zeros((14, 14, 14), bool)
    pred[2:9, 3:11, 1:8] = blob(rng, (7, 8, 7), 0.8)  # compact blobs away from the border
    ref[4:12, 2:9, 5:13] = blob(rng, (8, 7, 8), 0.8)
    b_pr, b_rp = bf_directed(pred, ref, spacing)
    want_hd95 = max(np.percentile(b_pr, 95), np.percentile(b_rp, 95))
    want_msd = np.concatenate([b_pr, b_rp]).mean()
    assert M.hd95(pred, ref, spacing) == pytest.approx(want_hd95, rel=1e-12)
    assert M.mean_surface_distance(pred, ref, spacing) == pytest.approx(want_msd, rel=1e-12)
    assert M.hausdorff_distance(pred, ref, spacing) == pytest.approx(max(b_pr.max(), b_rp.max()))


def test_hd95_is_max_of_directed_not_pooled_percentile():
    # A 20-voxel line vs its first voxel: pred->ref distances are 0, 2, ..., 38 mm,
    # ref->pred is a single 0. Pooling adds that 0 and shifts the 95th percentile,
    # so the two conventions give different numbers.
    pred = np.zeros((1, 20, 1), bool)
    ref = np.zeros((1, 20, 1), bool)
    pred[0, :, 0] = True  # 20 surface voxels at y = 0..19
    ref[0, 0, 0] = True  # 1 surface voxel at y = 0
    spacing = (1.0, 2.0, 1.0)
    d_pr = np.arange(20) * 2.0  # pred -> ref
    d_rp = np.array([0.0])  # ref -> pred
    directed = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    pooled = np.percentile(np.concatenate([d_pr, d_rp]), 95)
    assert directed != pytest.approx(pooled)  # the test would not discriminate otherwise
    assert M.hd95(pred, ref, spacing) == pytest.approx(directed)
    assert M.hd95(ref, pred, spacing) == pytest.approx(directed)  # symmetric
    # Pooled mean (MONAI) vs mean of directed means (medpy): (380/20 + 0)/2 = 19 vs 380/21.
    assert M.mean_surface_distance(pred, ref, spacing) == pytest.approx(d_pr.sum() / 21)


def test_single_voxels_anisotropic_distance():
    a = np.zeros((5, 5, 5), bool)
    b = np.zeros((5, 5, 5), bool)
    a[0, 0, 0] = True
    b[3, 2, 1] = True
    want = math.sqrt((3 * 1.0) ** 2 + (2 * 2.0) ** 2 + (1 * 3.5) ** 2)
    assert M.hd95(a, b, ANISO) == pytest.approx(want)
    assert M.mean_surface_distance(a, b, ANISO) == pytest.approx(want)
    assert M.hd95(a, a, ANISO) == 0.0


def test_distance_empty_conventions():
    z = np.zeros((4, 4, 4), bool)
    one = z.copy()
    one[1, 2, 3] = True
    for f in (M.hd95, M.mean_surface_distance, M.hausdorff_distance):
        assert math.isnan(f(z, z))
        assert f(z, one) == math.inf
        assert f(one, z) == math.inf
    with pytest.raises(ValueError):
        M.surface_distances(z, one)


def test_bad_spacing_and_percentile_raise():
    m = np.ones((2, 2, 2), bool)
    with pytest.raises(ValueError):
        M.hd95(m, m, (1.0, 1.0))
    with pytest.raises(ValueError):
        M.hd95(m, m, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError):
        M.hausdorff_distance(m, m, percentile=101)


# --------------------------------------------------------------------------- lesion-wise


def test_corner_contact_is_two_lesions_edge_contact_is_one():
    corner = np.zeros((3, 3, 3), bool)
    corner[0, 0, 0] = corner[1, 1, 1] = True  # share only a vertex: 26- but not 18-connected
    edge = np.zeros((3, 3, 3), bool)
    edge[0, 0, 0] = edge[1, 1, 0] = True  # share an edge: 18-connected
    assert M.connected_components(corner)[1] == 2
    assert M.connected_components(edge)[1] == 1
    # Predicting only one of the two corner-touching voxels detects half the lesions.
    pred = np.zeros_like(corner)
    pred[0, 0, 0] = True
    assert M.ltpr(pred, corner) == pytest.approx(0.5)
    assert M.ltpr(pred, edge) == pytest.approx(1.0)


def test_single_voxel_overlap_detects_lesion():
    ref = np.zeros((10, 10, 10), bool)
    ref[2:6, 2:6, 2:6] = True  # one 64-voxel lesion
    ref[8, 8, 8] = True  # a second, missed lesion
    pred = np.zeros_like(ref)
    pred[5, 5, 5] = True
    pred[5, 6, 5] = True  # same predicted component, pokes outside the lesion
    pred[0, 9, 0] = True  # a false-positive component
    assert M.ltpr(pred, ref) == pytest.approx(1 / 2)
    assert M.lfpr(pred, ref) == pytest.approx(1 / 2)
    assert M.dice(pred, ref) < 0.05  # voxel-wise the prediction is terrible


def test_lesion_empty_conventions():
    z = np.zeros((4, 4, 4), bool)
    one = z.copy()
    one[1, 1, 1] = True
    assert math.isnan(M.ltpr(one, z)) and M.lfpr(one, z) == 1.0 and M.lfpr(one, z, "nan") == 1.0
    assert M.lfpr(z, one) == 0.0 and M.ltpr(z, one) == 0.0
    assert math.isnan(M.ltpr(z, z)) and M.lfpr(z, z) == 0.0
    assert math.isnan(M.lfpr(z, one, "nan")) and math.isnan(M.lfpr(z, z, empty_pred="nan"))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lesion_rates_match_bfs(seed):
    rng = np.random.default_rng(seed)
    # Sparse noise: many small components with corner-only contacts.
    pred, ref = rng.random((10, 10, 10)) < 0.08, rng.random((10, 10, 10)) < 0.08
    comps = bf_components(ref)
    assert M.connected_components(ref)[1] == len(comps)
    assert M.connected_components(ref)[1] != len(bf_components_26(ref))  # seed really exercises 18 vs 26
    want_ltpr, want_lfpr = bf_lesion_rates(pred, ref)
    assert M.ltpr(pred, ref) == pytest.approx(want_ltpr)
    assert M.lfpr(pred, ref) == pytest.approx(want_lfpr)


def bf_components_26(mask: np.ndarray) -> list:
    from scipy import ndimage

    return list(range(ndimage.label(mask, structure=np.ones((3, 3, 3)))[1]))


# --------------------------------------------------------------------------- volumes, correlation, ISBI


def test_volume_mm3():
    m = np.zeros((4, 4, 4), bool)
    m[0, 0, :3] = m[1, 1, 1] = m[3, 3, 3] = True
    assert M.volume_mm3(m, ANISO) == pytest.approx(5 * 1.0 * 2.0 * 3.5)


def test_volume_correlation():
    rng = np.random.default_rng(7)
    x = rng.random(9) * 1000
    y = 0.8 * x + rng.normal(0, 100, 9)
    xm, ym = x - x.mean(), y - y.mean()
    hand = (xm * ym).sum() / math.sqrt((xm**2).sum() * (ym**2).sum())
    assert M.volume_correlation(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert M.volume_correlation(x, y) == pytest.approx(hand)
    assert M.volume_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(M.volume_correlation([1.0], [2.0]))
    assert math.isnan(M.volume_correlation([1, 2, 3], [5, 5, 5]))


def test_volume_correlation_from_masks_uses_spacing():
    # Per-case volumes from masks with different spacings: only mm^3 values make
    # the prediction perfectly correlated with the reference here.
    rng = np.random.default_rng(11)
    spacings = [(1.0, 1.0, 1.0), ANISO, (0.5, 0.5, 4.0), (2.0, 2.0, 2.0)]
    pv, rv = [], []
    for i, s in enumerate(spacings):
        ref = rng.random((6, 6, 6)) < 0.1 + 0.1 * i
        pv.append(M.volume_mm3(ref, s) * 1.1)
        rv.append(M.volume_mm3(ref, s))
    assert M.volume_correlation(pv, rv) == pytest.approx(1.0)


def test_isbi_score_hand_numbers():
    # 0.8/8 + 0.6/8 + (1-0.2)/4 + 0.5/4 + 0.9/4 = 0.1 + 0.075 + 0.2 + 0.125 + 0.225
    assert M.isbi_score(dice=0.8, ppv=0.6, ltpr=0.5, lfpr=0.2, corr=0.9) == pytest.approx(0.725)
    assert M.isbi_score(1.0, 1.0, 1.0, 0.0, 1.0) == pytest.approx(1.0)


# --------------------------------------------------------------------------- summary


def test_summarize_matches_numpy_and_ignores_nan():
    rng = np.random.default_rng(5)
    v = rng.random(23)
    with_nan = np.concatenate([v, [np.nan] * 4])
    s = M.summarize(with_nan.tolist())
    assert s["n"] == 23
    assert s["mean"] == pytest.approx(v.mean())
    assert s["std"] == pytest.approx(v.std(ddof=1))
    for q in (50, 25, 10, 5):
        assert s[f"p{q}"] == pytest.approx(np.percentile(v, q))  # numpy default: linear
    # Hand check of linear interpolation: [1,2,3,4] -> p25 at index 0.75 -> 1.75.
    assert M.summarize([4, 1, 3, 2])["p25"] == pytest.approx(1.75)


def test_summarize_degenerate():
    s = M.summarize([np.nan, np.nan])
    assert s["n"] == 0 and all(math.isnan(s[k]) for k in ("mean", "std", "p50", "p5"))
    s = M.summarize([2.0])
    assert s["n"] == 1 and s["mean"] == 2.0 and s["p5"] == 2.0 and math.isnan(s["std"])
    # inf (missed structure HD95) stays visible instead of turning into NaN.
    s = M.summarize([1.0, 2.0, math.inf, math.inf])
    assert s["mean"] == math.inf and math.isnan(s["std"])
    assert s["p50"] == math.inf and s["p25"] == pytest.approx(1.75)


# --------------------------------------------------------------------------- evaluate_case


def test_evaluate_case():
    rng = np.random.default_rng(9)
    pred = np.zeros((12, 12, 12), np.uint8)
    ref = np.zeros((12, 12, 12), np.uint8)
    pred[1:7, 2:9, 3:8] = 1
    ref[2:8, 2:8, 2:8] = 1
    pred[8:11, 8:11, 8:11] = np.where(blob(rng, (3, 3, 3), 0.7), 2, 0)
    ref[7:11, 8:11, 9:12] = 2
    pred[0, 0, 0] = 3  # label 3 only in pred; label 4 in neither
    row = M.evaluate_case(pred, ref, [1, 2, 3, 4], ANISO)
    assert set(row) == {f"{k}_{l}" for k in ("dice", "iou", "hd95", "msd", "vol_pred", "vol_ref") for l in (1, 2, 3, 4)}
    for l in (1, 2):
        b_pr, b_rp = bf_directed(pred == l, ref == l, ANISO)
        assert row[f"hd95_{l}"] == pytest.approx(max(np.percentile(b_pr, 95), np.percentile(b_rp, 95)))
        assert row[f"msd_{l}"] == pytest.approx(np.concatenate([b_pr, b_rp]).mean())
        inter = np.sum((pred == l) & (ref == l))
        assert row[f"dice_{l}"] == pytest.approx(2 * inter / (np.sum(pred == l) + np.sum(ref == l)))
        assert row[f"vol_ref_{l}"] == pytest.approx(np.sum(ref == l) * 7.0)
    assert row["dice_3"] == 0.0 and row["hd95_3"] == math.inf and row["msd_3"] == math.inf
    assert all(math.isnan(row[f"{k}_4"]) for k in ("dice", "iou", "hd95", "msd"))
    assert row["vol_pred_4"] == 0.0
