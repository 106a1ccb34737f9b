"""Host-side segmentation metrics on full volumes (numpy/scipy only, no JAX).

Inputs are 3D numpy arrays: integer label maps for the ``*_per_class`` functions
and :func:`evaluate_case`, binary masks (anything castable to bool; non-zero is
foreground) for the rest. ``spacing`` is the voxel size in mm along each array
axis, default ``(1.0, 1.0, 1.0)``.

Conventions (one rule everywhere, so summaries stay comparable):

* Ratio metrics (Dice, IoU, PPV, TPR, LTPR, LFPR) are NaN when their
  denominator is 0, i.e. when the quantity is undefined. For Dice/IoU this is
  nnU-Net's rule: a class absent from both prediction and reference is NaN, not
  1 and not 0. :func:`summarize` drops NaNs and reports how many values it used.
  One exception by default: an empty prediction scores PPV 0 and LFPR 0, as the
  ISBI 2015 challenge and DeepLesionBrain score it, so a case where a method
  found nothing stays in the averages. ``empty_pred="nan"`` restores the
  undefined-is-NaN rule for these two (:data:`EMPTY_PRED_CONVENTIONS`).
* Surface voxels are ``mask & ~binary_erosion(mask, 6-connected cross)``: a voxel
  is on the surface when one of its 6 face neighbours is background. Voxels on
  the array border count as surface (the outside is background). Same as
  MONAI's ``get_mask_edges`` and medpy's default ``connectivity=1``.
* HD95 is ``max(P95(d(pred->ref)), P95(d(ref->pred)))``, the maximum of the two
  directed 95th percentiles. This is what MONAI's
  ``compute_hausdorff_distance(percentile=95)`` and medpy's ``hd95`` compute; it
  is *not* the 95th percentile of the pooled distances. Percentiles use numpy's
  default ``linear`` interpolation.
* MSD (average symmetric surface distance) is the mean of the pooled distances,
  ``(sum d(pred->ref) + sum d(ref->pred)) / (|S_pred| + |S_ref|)``, as MONAI's
  ``compute_average_surface_distance(symmetric=True)``. (medpy's ``assd`` instead
  averages the two directed means; the two differ when surface sizes differ.)
* Distances with both masks empty are NaN (nothing to measure). With exactly one
  empty they are ``inf``: the Hausdorff distance from a non-empty set to the
  empty set is +inf by definition, and NaN would let a completely missed (or
  hallucinated) structure silently drop out of NaN-aware averages.
* Lesions are connected components with 18-connectivity
  (``generate_binary_structure(3, 2)``: face and edge neighbours, not corners).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

Spacing = tuple[float, float, float]

LESION_STRUCTURE = ndimage.generate_binary_structure(3, 2)  # 18-connectivity
SURFACE_STRUCTURE = ndimage.generate_binary_structure(3, 1)  # 6-connectivity


# --------------------------------------------------------------------------- helpers


def _mask(x: ArrayLike) -> np.ndarray:
    m = np.asarray(x).astype(bool, copy=False)
    if m.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {m.shape}")
    return m


def _pair(pred: ArrayLike, ref: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, r = _mask(pred), _mask(ref)
    if p.shape != r.shape:
        raise ValueError(f"shape mismatch: pred {p.shape} vs ref {r.shape}")
    return p, r


def _spacing(spacing: Sequence[float]) -> Spacing:
    s = tuple(float(v) for v in spacing)
    if len(s) != 3 or not all(v > 0 for v in s):
        raise ValueError(f"spacing must be 3 positive floats, got {spacing}")
    return s  # type: ignore[return-value]


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


EmptyPred = Literal["zero", "nan"]
EMPTY_PRED_CONVENTIONS = ("zero", "nan")
EMPTY_PRED_NOTES = {
    "zero": "an empty prediction scores PPV = 0 and LFPR = 0 (ISBI 2015 convention)",
    "nan": "PPV and LFPR of an empty prediction are undefined (NaN) and left out of the means",
}


def _empty_pred_ratio(num: float, den: float, empty_pred: EmptyPred) -> float:
    if empty_pred not in EMPTY_PRED_CONVENTIONS:
        raise ValueError(f"empty_pred must be one of {EMPTY_PRED_CONVENTIONS}, got {empty_pred!r}")
    return 0.0 if not den and empty_pred == "zero" else _ratio(num, den)


# --------------------------------------------------------------------------- overlap


def dice(pred: ArrayLike, ref: ArrayLike) -> float:
    """Dice of two binary masks; NaN when both are empty."""
    p, r = _pair(pred, ref)
    return _ratio(2 * np.count_nonzero(p & r), np.count_nonzero(p) + np.count_nonzero(r))


def iou(pred: ArrayLike, ref: ArrayLike) -> float:
    """Intersection over union of two binary masks; NaN when both are empty."""
    p, r = _pair(pred, ref)
    return _ratio(np.count_nonzero(p & r), np.count_nonzero(p | r))


def dice_per_class(pred: ArrayLike, ref: ArrayLike, labels: Iterable[int]) -> dict[int, float]:
    """Dice per label of two label maps, ``{label: dice}``; NaN for labels absent in both."""
    p, r = np.asarray(pred), np.asarray(ref)
    return {int(l): dice(p == l, r == l) for l in labels}


def iou_per_class(pred: ArrayLike, ref: ArrayLike, labels: Iterable[int]) -> dict[int, float]:
    """IoU per label of two label maps, ``{label: iou}``; NaN for labels absent in both."""
    p, r = np.asarray(pred), np.asarray(ref)
    return {int(l): iou(p == l, r == l) for l in labels}


def ppv(pred: ArrayLike, ref: ArrayLike, empty_pred: EmptyPred = "zero") -> float:
    """Precision TP / (TP + FP); an empty prediction gives 0 (``empty_pred="nan"``: NaN)."""
    p, r = _pair(pred, ref)
    return _empty_pred_ratio(np.count_nonzero(p & r), np.count_nonzero(p), empty_pred)


def tpr(pred: ArrayLike, ref: ArrayLike) -> float:
    """Sensitivity TP / (TP + FN); NaN when the reference is empty."""
    p, r = _pair(pred, ref)
    return _ratio(np.count_nonzero(p & r), np.count_nonzero(r))


# --------------------------------------------------------------------------- surface distances


def surface(mask: ArrayLike) -> np.ndarray:
    """Boundary voxels: the mask minus its 6-connected erosion (array border = outside)."""
    m = _mask(mask)
    return m & ~ndimage.binary_erosion(m, structure=SURFACE_STRUCTURE, border_value=0)


def surface_distances(
    pred: ArrayLike, ref: ArrayLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(pred surface -> ref surface, ref -> pred)``.

    Both masks must be non-empty. Each entry is the Euclidean distance from one
    surface voxel centre to the nearest surface voxel centre of the other mask.
    """
    p, r = _pair(pred, ref)
    s = _spacing(spacing)
    if not p.any() or not r.any():
        raise ValueError("surface_distances needs two non-empty masks")
    # Crop to the union's bounding box: the EDT is exact in any box holding all
    # feature voxels, and everything outside the box is background, which is what
    # erosion's border_value=0 assumes. Same result, much cheaper on full volumes.
    box = ndimage.find_objects((p | r).astype(np.int8))[0]
    p, r = p[box], r[box]
    sp, sr = surface(p), surface(r)
    to_ref = ndimage.distance_transform_edt(~sr, sampling=s)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=s)
    return to_ref[sp], to_pred[sr]


def _empty_distance(p: np.ndarray, r: np.ndarray) -> float | None:
    """NaN if both empty, inf if exactly one is, None if distances are defined."""
    hp, hr = p.any(), r.any()
    if not hp and not hr:
        return math.nan
    if hp != hr:
        return math.inf
    return None


def _hd_from(d_pr: np.ndarray, d_rp: np.ndarray, percentile: float) -> float:
    return float(max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile)))


def _msd_from(d_pr: np.ndarray, d_rp: np.ndarray) -> float:
    return float((d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size))


def hausdorff_distance(
    pred: ArrayLike,
    ref: ArrayLike,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    percentile: float = 100.0,
) -> float:
    """Symmetric (percentile) Hausdorff distance in mm: max of the two directed percentiles.

    NaN when both masks are empty, inf when exactly one is.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    p, r = _pair(pred, ref)
    empty = _empty_distance(p, r)
    if empty is not None:
        return empty
    return _hd_from(*surface_distances(p, r, spacing), percentile)


def hd95(pred: ArrayLike, ref: ArrayLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """95th-percentile Hausdorff distance in mm (MONAI/medpy convention, see module doc)."""
    return hausdorff_distance(pred, ref, spacing, percentile=95.0)


def mean_surface_distance(
    pred: ArrayLike, ref: ArrayLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> float:
    """Average symmetric surface distance in mm (pooled mean); NaN both empty, inf one empty."""
    p, r = _pair(pred, ref)
    empty = _empty_distance(p, r)
    if empty is not None:
        return empty
    return _msd_from(*surface_distances(p, r, spacing))


# --------------------------------------------------------------------------- lesion-wise


def connected_components(mask: ArrayLike) -> tuple[np.ndarray, int]:
    """18-connected components: ``(label image with 1..n, n)``."""
    labels, n = ndimage.label(_mask(mask), structure=LESION_STRUCTURE)
    return labels, int(n)


def _n_touched(components: np.ndarray, other: np.ndarray) -> int:
    """How many distinct components have at least one voxel inside ``other``."""
    hit = np.unique(components[other])
    return int(np.count_nonzero(hit))  # drops the background label 0


def ltpr(pred: ArrayLike, ref: ArrayLike) -> float:
    """Lesion-wise TPR: reference lesions overlapping the prediction by >= 1 voxel / reference lesions.

    NaN when the reference has no lesions.
    """
    p, r = _pair(pred, ref)
    comps, n = connected_components(r)
    return _ratio(_n_touched(comps, p), n)


def lfpr(pred: ArrayLike, ref: ArrayLike, empty_pred: EmptyPred = "zero") -> float:
    """Lesion-wise FPR: predicted components with no reference overlap / predicted components.

    A prediction with no components gives 0 (no false positives; ``empty_pred="nan"``: NaN).
    """
    p, r = _pair(pred, ref)
    comps, n = connected_components(p)
    return _empty_pred_ratio(n - _n_touched(comps, r), n, empty_pred)


# --------------------------------------------------------------------------- volumes


def volume_mm3(mask: ArrayLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Foreground volume in mm^3."""
    return float(np.count_nonzero(_mask(mask)) * math.prod(_spacing(spacing)))


def volume_correlation(pred_volumes: Sequence[float], ref_volumes: Sequence[float]) -> float:
    """Pearson correlation of per-case predicted vs reference volumes.

    Takes volumes rather than masks so callers never hold all cases in memory.
    NaN with fewer than 2 cases or zero variance on either side; NaN inputs propagate.
    """
    x = np.asarray(pred_volumes, dtype=np.float64)
    y = np.asarray(ref_volumes, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two 1D sequences of equal length, got {x.shape} and {y.shape}")
    if x.size < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return _ratio(float(dx @ dy), den)


def isbi_score(dice: float, ppv: float, ltpr: float, lfpr: float, corr: float) -> float:
    """ISBI 2015 MS-lesion hybrid score: Dice/8 + PPV/8 + (1 - LFPR)/4 + LTPR/4 + Corr/4."""
    return dice / 8 + ppv / 8 + (1 - lfpr) / 4 + ltpr / 4 + corr / 4


# --------------------------------------------------------------------------- reporting

SUMMARY_PERCENTILES = (50, 25, 10, 5)


def _percentile(sorted_values: np.ndarray, q: float) -> float:
    """numpy's default ``linear`` percentile, but inf-safe (np.percentile gives NaN for inf-inf)."""
    pos = q / 100.0 * (sorted_values.size - 1)
    lo = math.floor(pos)
    frac = pos - lo
    if frac == 0.0:
        return float(sorted_values[lo])
    return float((1.0 - frac) * sorted_values[lo] + frac * sorted_values[lo + 1])


def summarize(values: Iterable[float]) -> dict[str, float]:
    """NaN-aware summary: ``n`` (values used), ``mean``, ``std`` (ddof=1), ``p50``, ``p25``, ``p10``, ``p5``.

    NaNs are dropped. Percentiles use numpy's default linear interpolation. The
    low percentiles describe the worst cases of a higher-is-better metric (Dice),
    as in the fetal DRO paper's Table 2. An ``inf`` (missed structure, see module
    doc) makes the mean inf and the std NaN, and shows in the percentiles it reaches.
    With no values left everything is NaN and ``n`` is 0; with one, std is NaN.
    """
    v = np.asarray(list(values), dtype=np.float64).ravel()
    v = np.sort(v[~np.isnan(v)])
    out: dict[str, float] = {"n": int(v.size)}
    if v.size == 0:
        out.update(mean=math.nan, std=math.nan)
        out.update({f"p{q}": math.nan for q in SUMMARY_PERCENTILES})
        return out
    out["mean"] = float(v.mean())
    if v.size > 1 and np.isfinite(v).all():
        out["std"] = float(v.std(ddof=1))
    else:
        out["std"] = math.nan
    out.update({f"p{q}": _percentile(v, q) for q in SUMMARY_PERCENTILES})
    return out


def evaluate_case(
    pred: ArrayLike,
    ref: ArrayLike,
    labels: Iterable[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, float]:
    """Flat per-case row for a CSV.

    Keys per label ``l``: ``dice_l``, ``iou_l``, ``hd95_l``, ``msd_l`` (mm),
    ``vol_pred_l``, ``vol_ref_l`` (mm^3, for :func:`volume_correlation`).
    """
    p, r = np.asarray(pred), np.asarray(ref)
    if p.shape != r.shape:
        raise ValueError(f"shape mismatch: pred {p.shape} vs ref {r.shape}")
    s = _spacing(spacing)
    row: dict[str, float] = {}
    for l in labels:
        pm, rm = _mask(p == l), _mask(r == l)
        row[f"dice_{l}"] = dice(pm, rm)
        row[f"iou_{l}"] = iou(pm, rm)
        empty = _empty_distance(pm, rm)
        if empty is None:
            # One EDT pair per class serves both distance metrics.
            d_pr, d_rp = surface_distances(pm, rm, s)
            row[f"hd95_{l}"] = _hd_from(d_pr, d_rp, 95.0)
            row[f"msd_{l}"] = _msd_from(d_pr, d_rp)
        else:
            row[f"hd95_{l}"] = row[f"msd_{l}"] = empty
        row[f"vol_pred_{l}"] = volume_mm3(pm, s)
        row[f"vol_ref_{l}"] = volume_mm3(rm, s)
    return row
