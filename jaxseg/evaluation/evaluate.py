"""Evaluate a folder of predicted label maps against reference label maps.

:func:`evaluate_folder` gives one row per case (``case``, ``method``, ``stratum`` and the
:func:`~jaxseg.evaluation.metrics.evaluate_case` metrics, keyed by structure *name*:
``dice_WM``, ``iou_WM``, ``hd95_WM``, ``msd_WM``, ``vol_pred_WM``, ``vol_ref_WM``).
:func:`evaluate_lesions` is the binary lesion variant (MS lesions: Dice, PPV, TPR, LTPR, LFPR per
case, plus the across-case volume correlation and the ISBI-2015 score). :func:`write_case_csv` /
:func:`read_case_csv` store the rows.

Predictions are found as ``pred_dir/<case_id>.nii.gz`` (or ``.nii``), nnU-Net's convention. The
reference is a dataset (an nnU-Net raw folder or a CSV manifest, read with
:func:`~jaxseg.data.datasets.read_dataset`, or an already read :class:`Dataset`) or a mapping
``case_id -> label path``; only cases that have a reference label are evaluated. Predictions
without a reference are ignored.

Every prediction must lie on its reference's voxel grid: same 3D shape and same affine (within
``affine_atol`` mm). Anything else raises :class:`~jaxseg.data.io.DataError` naming both files;
nothing is resampled, because a silent resampling would hide an inference bug. The voxel spacing
used for distances and volumes comes from the *reference* header (the column norms of its
affine, i.e. mm along each array axis).

A missing prediction raises :class:`DataError` naming the case and the file looked for. With
``allow_missing=True`` the case is skipped instead and listed in the result's ``.missing``
attribute (the result is a ``list`` subclass), and a warning is issued: skipping silently would
bias the summaries upwards, since a missing prediction is usually a failed one.

Cases are evaluated in ``num_workers`` processes (``spawn`` start method, so it is safe to call
from a process that has already started JAX's threads); ``num_workers <= 1`` evaluates in this
process. Rows come back in case-id order either way.
"""

from __future__ import annotations

import csv
import math
import multiprocessing as mp
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from jaxseg.fileio import atomic_path
from jaxseg.data.datasets import Dataset, read_dataset
from jaxseg.data.io import DataError, load_nifti, voxel_spacing
from jaxseg.evaluation import metrics as M

__all__ = [
    "CaseRows",
    "evaluate_folder",
    "evaluate_lesions",
    "find_prediction",
    "write_case_csv",
    "read_case_csv",
    "ID_COLUMNS",
    "PRED_ENDINGS",
]

ID_COLUMNS = ("case", "method", "stratum")
PRED_ENDINGS = (".nii.gz", ".nii")
LESION_METRICS = ("dice", "ppv", "tpr", "ltpr", "lfpr")


class CaseRows(list):
    """The per-case rows (a plain ``list`` of dicts) plus ``missing``: the case ids skipped
    because their prediction file was absent (only ever non-empty with ``allow_missing=True``)."""

    def __init__(self, rows: Iterable[dict] = (), missing: Iterable[str] = ()):
        super().__init__(rows)
        self.missing: list[str] = list(missing)


# --------------------------------------------------------------------------- inputs


def _references(reference: Any) -> tuple[dict[str, Path], dict[str, str | None], dict[str, int] | None]:
    """``(case -> label path, case -> stratum from the dataset, dataset labels)``."""
    if isinstance(reference, Mapping):
        return {str(k): Path(v) for k, v in reference.items()}, {}, None
    ds = reference if isinstance(reference, Dataset) else read_dataset(reference)
    refs = {c.case_id: Path(c.label) for c in ds.cases if c.label is not None}
    if not refs:
        raise DataError(f"{ds.root}: no case has a reference label to evaluate against")
    return refs, {c.case_id: c.stratum for c in ds.cases}, ds.labels


def find_prediction(pred_dir: str | os.PathLike, case_id: str) -> Path | None:
    """``pred_dir/<case_id>.nii.gz`` or ``.nii``, whichever exists (None if neither)."""
    for ending in PRED_ENDINGS:
        p = Path(pred_dir) / f"{case_id}{ending}"
        if p.is_file():
            return p
    return None


def _collect(pred_dir, reference, strata, allow_missing, warn_missing=True):
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder not found")
    refs, ds_strata, ds_labels = _references(reference)
    if strata is not None:
        ds_strata = {str(k): v for k, v in strata.items()}
    tasks, missing = [], []
    for case in sorted(refs):
        pred = find_prediction(pred_dir, case)
        if pred is None:
            expected = " or ".join(str(pred_dir / f"{case}{e}") for e in PRED_ENDINGS)
            if not allow_missing:
                raise DataError(f"case {case!r}: prediction not found (looked for {expected})")
            missing.append(case)
            continue
        tasks.append((case, pred, refs[case], ds_strata.get(case)))
    if missing and warn_missing:
        warnings.warn(
            f"{len(missing)} of {len(refs)} case(s) have no prediction in {pred_dir} and were "
            f"skipped: {', '.join(missing)}",
            stacklevel=3,
        )
    return tasks, missing, ds_labels


def _as_labels(path: Path, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "f":
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise DataError(f"{path}: label map has non-integer values (a probability map?)")
        arr = rounded.astype(np.int32)
    return arr


def _load_pair(pred_path: Path, ref_path: Path, affine_atol: float):
    ref, ref_aff, _ = load_nifti(ref_path)
    pred, pred_aff, _ = load_nifti(pred_path)
    if pred.shape != ref.shape:
        raise DataError(
            f"{pred_path}: prediction shape {pred.shape} does not match reference {ref_path} "
            f"shape {ref.shape}"
        )
    if not np.allclose(pred_aff, ref_aff, rtol=0.0, atol=affine_atol):
        raise DataError(
            f"{pred_path}: prediction affine does not match reference {ref_path} "
            f"(max abs difference {float(np.abs(pred_aff - ref_aff).max()):.6g} > {affine_atol}): "
            f"{np.round(pred_aff, 6).tolist()} vs {np.round(ref_aff, 6).tolist()}"
        )
    return _as_labels(pred_path, pred), _as_labels(ref_path, ref), voxel_spacing(ref_aff)


# --------------------------------------------------------------------------- per-case workers


def _labels_case(task) -> dict[str, Any]:
    (case, pred_path, ref_path, stratum), method, labels, affine_atol, declared = task
    pred, ref, spacing = _load_pair(pred_path, ref_path, affine_atol)
    raw = M.evaluate_case(pred, ref, list(labels.values()), spacing)
    row: dict[str, Any] = {"case": case, "method": method, "stratum": stratum}
    # Reported by the parent: a warning raised in a worker process would not reach the user.
    row["_undeclared"] = [] if declared is None else sorted(int(v) for v in np.unique(pred) if int(v) not in declared)
    for name, value in labels.items():
        for key in ("dice", "iou", "hd95", "msd", "vol_pred", "vol_ref"):
            row[f"{key}_{name}"] = raw[f"{key}_{value}"]
    return row


def _lesion_case(task) -> dict[str, Any]:
    (case, pred_path, ref_path, stratum), method, lesion_labels, affine_atol, empty_pred = task
    pred, ref, spacing = _load_pair(pred_path, ref_path, affine_atol)
    p, r = np.isin(pred, lesion_labels), np.isin(ref, lesion_labels)
    return {
        "case": case,
        "method": method,
        "stratum": stratum,
        "dice": M.dice(p, r),
        "ppv": M.ppv(p, r, empty_pred),
        "tpr": M.tpr(p, r),
        "ltpr": M.ltpr(p, r),
        "lfpr": M.lfpr(p, r, empty_pred),
        "n_lesions_pred": M.connected_components(p)[1],
        "n_lesions_ref": M.connected_components(r)[1],
        "vol_pred": M.volume_mm3(p, spacing),
        "vol_ref": M.volume_mm3(r, spacing),
    }


def _run(fn, tasks: list, num_workers: int) -> list[dict]:
    workers = min(int(num_workers or 1), len(tasks))
    if workers <= 1:
        return [fn(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(fn, tasks, chunksize=max(1, len(tasks) // (4 * workers))))


# --------------------------------------------------------------------------- public API


def evaluate_folder(
    pred_dir: str | os.PathLike,
    reference: str | os.PathLike | Dataset | Mapping[str, str | os.PathLike],
    labels: Mapping[str, int] | None = None,
    *,
    strata: Mapping[str, str | None] | None = None,
    method: str = "",
    num_workers: int = 2,
    allow_missing: bool = False,
    include_background: bool = False,
    affine_atol: float = 1e-3,
    warn_missing: bool = True,
) -> CaseRows:
    """Per-case metrics of every prediction in ``pred_dir`` that has a reference.

    ``labels`` is name -> value (``{"WM": 3, "ventricles": 4}``); None takes the dataset's label
    set. The background (value 0) is skipped unless ``include_background``. ``strata`` maps case
    id -> stratum (None: the dataset's ``stratum`` column; cases without one get ``None``).
    ``method`` is written into every row (e.g. ``"ERM"``, ``"DRO"``) so rows of several methods
    can be concatenated for :func:`jaxseg.evaluation.report.compare_methods`.

    Returns a :class:`CaseRows` (list of dicts in case-id order, ``.missing`` = skipped cases).
    A prediction holding a value the reference dataset does not declare is evaluated (the value
    counts as background) with a warning naming the case and the values. ``warn_missing=False``: the caller
    reports ``.missing`` itself.
    """
    tasks, missing, ds_labels = _collect(pred_dir, reference, strata, allow_missing, warn_missing)
    labels = ds_labels if labels is None else labels
    if not labels:
        where = getattr(reference, "root", reference)
        hint = (" (a CSV manifest takes it from labels.json next to it: {\"background\": 0, \"name\": 1, ...})"
                if str(where).lower().endswith(".csv") else "")
        raise DataError(f"{where}: the reference declares no label set{hint}")
    # What the reference dataset declares (a mapping reference declares nothing: no check).
    declared = None if ds_labels is None else {0, *(int(v) for v in ds_labels.values())}
    labels = {str(k): int(v) for k, v in labels.items() if include_background or int(v) != 0}
    if not labels:
        raise ValueError("the label set has only the background; pass include_background=True")
    args = [(t, method, labels, affine_atol, declared) for t in tasks]
    rows = _run(_labels_case, args, num_workers)
    for row, (case, pred_path, _, _) in zip(rows, tasks):
        extra = row.pop("_undeclared")
        if extra:
            warnings.warn(f"case {case!r}: prediction {pred_path} has label value(s) {extra} that the reference "
                          f"does not declare (declared: {sorted(declared)}); they count as background", stacklevel=2)
    return CaseRows(rows, missing)


def evaluate_lesions(
    pred_dir: str | os.PathLike,
    reference: str | os.PathLike | Dataset | Mapping[str, str | os.PathLike],
    *,
    lesion_label: int | Sequence[int] = 1,
    strata: Mapping[str, str | None] | None = None,
    method: str = "",
    num_workers: int = 2,
    allow_missing: bool = False,
    affine_atol: float = 1e-3,
    empty_pred: M.EmptyPred = "zero",
) -> tuple[CaseRows, dict[str, Any]]:
    """Binary lesion evaluation: ``(rows, summary)``.

    The lesion mask is ``isin(label_map, lesion_label)`` for both prediction and reference.
    Rows: ``dice``, ``ppv``, ``tpr``, ``ltpr``, ``lfpr``, ``n_lesions_pred``, ``n_lesions_ref``,
    ``vol_pred``, ``vol_ref`` (mm^3). The summary has ``n_cases``, ``missing``, one
    :func:`~jaxseg.evaluation.metrics.summarize` dict per metric (``summary["dice"]["mean"]``),
    ``volume_correlation`` (Pearson, across cases), ``isbi_score`` and ``empty_pred``: the
    convention for PPV / LFPR of an empty prediction (``"zero"``, the ISBI 2015 scoring, or
    ``"nan"``: undefined, dropped from the means; see :mod:`jaxseg.evaluation.metrics`).

    The ISBI-2015 score is defined as the average over cases of
    ``Dice/8 + PPV/8 + (1 - LFPR)/4 + LTPR/4 + Corr/4`` with one across-case ``Corr``; being
    linear, that equals :func:`~jaxseg.evaluation.metrics.isbi_score` of the case means, which is
    what is computed (each mean NaN-aware: cases where a ratio is undefined drop out of it).
    """
    if empty_pred not in M.EMPTY_PRED_CONVENTIONS:
        raise ValueError(f"empty_pred must be one of {M.EMPTY_PRED_CONVENTIONS}, got {empty_pred!r}")
    labels = [int(lesion_label)] if np.isscalar(lesion_label) else [int(v) for v in lesion_label]
    tasks, missing, _ = _collect(pred_dir, reference, strata, allow_missing)
    args = [(t, method, labels, affine_atol, empty_pred) for t in tasks]
    rows = CaseRows(_run(_lesion_case, args, num_workers), missing)
    summary: dict[str, Any] = {"method": method, "n_cases": len(rows), "missing": list(missing),
                               "empty_pred": empty_pred}
    for key in LESION_METRICS:
        summary[key] = M.summarize(r[key] for r in rows)
    corr = M.volume_correlation([r["vol_pred"] for r in rows], [r["vol_ref"] for r in rows])
    summary["volume_correlation"] = corr
    summary["isbi_score"] = M.isbi_score(
        *(summary[k]["mean"] for k in ("dice", "ppv", "ltpr", "lfpr")), corr
    )
    return rows, summary


# --------------------------------------------------------------------------- CSV


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols = [c for c in ID_COLUMNS if any(c in r for r in rows)]
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # shortest exact round-trip form; 'nan', 'inf'
    return str(value)


def write_case_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows to CSV atomically (temp file in the same folder, then ``os.replace``).

    Columns: ``case, method, stratum`` first, then every other key in first-seen order; missing
    cells and ``None`` are empty; floats are written exactly (``repr``), NaN as ``nan`` and
    infinity as ``inf``. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows)
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in cols])
    return path


def _parse(column: str, text: str) -> Any:
    if text == "":
        return None
    if column in ID_COLUMNS:
        return text
    try:
        v = float(text)
    except ValueError:
        return text
    if column.startswith("n_") and math.isfinite(v) and v == int(v):
        return int(v)
    return v


def read_case_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read rows written by :func:`write_case_csv`: ids stay strings, empty cells become
    ``None``, other cells floats where they parse (``n_*`` counts as ints)."""
    with open(path, newline="") as f:
        return [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
