"""``prepare``: raw dataset -> checked, reoriented, cropped, normalised case store.

Per case (nnU-Net order):

1. load every channel and the label (:func:`jaxseg.data.io.load_nifti`: readable, 3D, finite);
2. check geometry: every channel and the label have the same shape and affines that agree
   within ``AFFINE_ATOL_MM`` (origin, mm) / ``AFFINE_ATOL_LINEAR`` (3x3 rotation-zoom part); label
   values are integers in the declared label set; no channel is all zero;
3. reorient to RAS (axis permutation/flips only; ``undo`` recorded);
4. crop to the bounding box of the voxels that are nonzero in any channel (extended to include
   any labelled voxel, so that no annotation is cropped away; the box is recorded);
5. z-score each channel over the nonzero mask (voxels nonzero in any channel; no hole filling;
   std floored at 1e-8); voxels outside the mask are set to 0;
6. optionally resample to ``target_spacing`` (image: cubic spline, label: nearest; pixel-edge
   aligned like skimage's resize; no separate handling of anisotropic axes);
7. write with :func:`jaxseg.data.store.write_case`; ``meta.json`` holds everything needed to map
   a prediction back (:func:`restore_geometry`).

Every bad input raises :class:`~jaxseg.data.io.DataError` naming the file and the problem; with
``skip_bad=True`` the case is rejected instead and listed in ``store_root/rejected.json``.
Cases already complete in the store are skipped while their source files are unchanged (path, size,
mtime recorded in meta.json; changed ones are redone), so a killed run can simply be rerun.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from nibabel.orientations import aff2axcodes
from scipy import ndimage

from . import store
from .datasets import CaseRecord, Dataset, read_dataset
from .io import (SPACING_MAX_MM, SPACING_MIN_MM, DataError, canonical_spacing, check_spacing, from_canonical,
                 load_header, load_nifti, to_canonical)

__all__ = [
    "prepare",
    "prepare_case",
    "preprocess_case",
    "resample_image",
    "restore_geometry",
    "check_affines",
    "median_spacing",
    "source_fingerprint",
    "AFFINE_ATOL_MM",
    "AFFINE_ATOL_LINEAR",
]

AFFINE_ATOL_MM = 1e-3  # origin / translation tolerance, mm
AFFINE_ATOL_LINEAR = 1e-4  # tolerance on the 3x3 (rotation x voxel size) part
PREPROCESSING_VERSION = 1
MAX_RESAMPLED_VOXELS = 2 ** 30  # per channel; beyond this a bad spacing, not a real volume
SPACING_OUTLIER_FACTOR = 10.0  # a case this many times off the median spacing (any axis) is warned about


# --------------------------------------------------------------------------- checks


def check_affines(a: np.ndarray, b: np.ndarray, path_a: Any, path_b: Any, *,
                  atol_mm: float = AFFINE_ATOL_MM, atol_linear: float = AFFINE_ATOL_LINEAR) -> None:
    """Raise :class:`DataError` naming both files when the two affines disagree."""
    d_lin = float(np.max(np.abs(a[:3, :3] - b[:3, :3])))
    d_t = float(np.max(np.abs(a[:3, 3] - b[:3, 3])))
    if d_lin > atol_linear or d_t > atol_mm:
        raise DataError(
            f"{path_b}: affine does not match {path_a} (max difference {d_t:.3g} mm in the origin, "
            f"{d_lin:.3g} in the rotation/voxel-size part; tolerance {atol_mm} mm / {atol_linear})\n"
            f"  {path_a}: {np.round(a, 5).tolist()}\n  {path_b}: {np.round(b, 5).tolist()}"
        )


def _load_checked(rec: CaseRecord, label_values: set[int] | None):
    """Load and check one case; returns (image (X,Y,Z,C) float32, label uint8 | None, affine, header)."""
    if rec.problem:
        raise DataError(rec.problem)
    if not rec.images:
        raise DataError(f"case {rec.case_id!r}: no image files")
    chans = []
    ref_path, ref_aff, ref_hdr, ref_shape = None, None, None, None
    for p in rec.images:
        data, aff, hdr = load_nifti(p)
        if ref_path is None:
            check_spacing(p, aff)
            ref_path, ref_aff, ref_hdr, ref_shape = p, aff, hdr, data.shape
        else:
            if data.shape != ref_shape:
                raise DataError(f"{p}: shape {data.shape} does not match {ref_path} with shape {ref_shape}")
            check_affines(ref_aff, aff, ref_path, p)
        if not np.any(data):
            raise DataError(f"{p}: all-zero image (no nonzero voxel)")
        chans.append(np.asarray(data, dtype=np.float32))
    image = np.stack(chans, axis=-1)
    label = None
    if rec.label is not None:
        lab, aff, _ = load_nifti(rec.label)
        if lab.shape != ref_shape:
            raise DataError(
                f"{rec.label}: label shape {lab.shape} does not match image {ref_path} with shape {ref_shape}")
        check_affines(ref_aff, aff, ref_path, rec.label)
        if lab.dtype.kind == "f":
            nonint = lab != np.round(lab)
            if nonint.any():
                ex = sorted({float(v) for v in np.unique(lab[nonint])[:5]})
                raise DataError(f"{rec.label}: non-integer label values, e.g. {ex}")
        values = {int(v) for v in np.unique(lab)}
        allowed = label_values if label_values is not None else set(range(256))
        unexpected = sorted(values - allowed)
        if unexpected:
            raise DataError(
                f"{rec.label}: label values {unexpected} are not in the declared label set "
                f"{sorted(allowed) if label_values is not None else '0..255'}")
        label = lab.astype(np.uint8)
    return image, label, ref_aff, ref_hdr


# --------------------------------------------------------------------------- geometry helpers


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Nearest source index for each output voxel, pixel-edge aligned: centre of output voxel i
    is at input coordinate (i + 0.5) * n_in / n_out - 0.5."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def _resample_nearest(arr: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    ix = [_nearest_indices(n, m) for n, m in zip(arr.shape[:3], new_shape)]
    return arr[ix[0][:, None, None], ix[1][None, :, None], ix[2][None, None, :]]


def resample_image(img: np.ndarray, new_shape: Sequence[int], order: int = 3) -> np.ndarray:
    """(X, Y, Z, C) -> (*new_shape, C) float32 by spline interpolation of `order`, pixel-edge aligned
    (prepare's images: 3; predict's logits back to the cropped grid: 1)."""
    out = np.empty((*new_shape, img.shape[-1]), dtype=np.float32)
    factors = [m / n for n, m in zip(img.shape[:3], new_shape)]
    for c in range(img.shape[-1]):
        r = ndimage.zoom(img[..., c].astype(np.float32), factors, order=order, mode="nearest", grid_mode=True)
        assert r.shape == tuple(new_shape), (r.shape, new_shape)
        out[..., c] = r
    return out


def _resampled_affine(affine: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray:
    f = np.asarray(in_shape, dtype=np.float64) / np.asarray(out_shape, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = np.diag(f)
    m[:3, 3] = 0.5 * f - 0.5
    return affine @ m


def _crop_box(image: np.ndarray, label: np.ndarray | None) -> tuple[np.ndarray, list[list[int]]]:
    mask = np.any(image != 0, axis=-1)
    keep = mask if label is None else (mask | (label != 0))
    idx = np.argwhere(keep)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    return mask, [[int(a), int(b)] for a, b in zip(lo, hi)]


def _header_spacings(records: Iterable[CaseRecord]) -> tuple[list[tuple[CaseRecord, tuple]], list[str]]:
    """(record, RAS spacing) for the readable first-channel headers, and the messages of those whose
    voxel size is implausible (left out)."""
    good, bad = [], []
    for r in records:
        if r.problem or not r.images:
            continue
        try:
            _, aff, _ = load_header(r.images[0])
            check_spacing(r.images[0], aff)
            good.append((r, canonical_spacing(aff)))
        except DataError as exc:
            if "implausible voxel size" in str(exc):
                bad.append(f"case {r.case_id!r}: {exc}")
    return good, bad


def median_spacing(records: Iterable[CaseRecord]) -> tuple[float, float, float] | None:
    """Median voxel spacing (RAS axis order) over the readable first-channel headers with a plausible
    voxel size (``SPACING_MIN_MM``..``SPACING_MAX_MM``)."""
    sp = [s for _, s in _header_spacings(records)[0]]
    if not sp:
        return None
    return tuple(float(v) for v in np.median(np.asarray(sp), axis=0))


def source_fingerprint(rec: CaseRecord) -> list[dict]:
    """Path, size and modification time of a case's source files (channels, then the label): a stored
    case counts as done only while these match."""
    out = []
    for p in [*rec.images, *([] if rec.label is None else [rec.label])]:
        st = os.stat(p)
        out.append({"path": str(p), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)})
    return out


def _stale_reason(root: Path, rec: CaseRecord) -> str | None:
    """Why the stored case ``rec.case_id`` must be redone (its sources changed), or None."""
    if rec.problem:
        return rec.problem
    try:
        old = store.read_case_meta(root, rec.case_id).get("source_fingerprint")
    except (OSError, ValueError):
        return "its meta.json is unreadable"
    if old is None:
        return "the store has no fingerprint of its source files (prepared by an older jaxseg)"
    try:
        new = source_fingerprint(rec)
    except OSError as exc:
        return f"a source file cannot be read: {exc}"
    old_paths, new_paths = [f["path"] for f in old], [f["path"] for f in new]
    if old_paths != new_paths:
        return f"its source files are now {new_paths}, the store's copy came from {old_paths}"
    for o, n in zip(old, new):
        if o != n:
            when = [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((f.get("mtime_ns") or 0) / 1e9)) for f in (o, n)]
            return (f"{n['path']} changed since it was prepared (size {o.get('size')} -> {n['size']} bytes, "
                    f"modified {when[0]} -> {when[1]})")
    return None


# --------------------------------------------------------------------------- one case


def preprocess_case(rec: CaseRecord, *, labels: dict[str, int] | None, channel_names: Sequence[str],
                    target_spacing: Sequence[float] | None, source: str = "", crop: bool = True
                    ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Load, check and preprocess one case (steps 1-6 of the module docstring), writing nothing.

    Returns the image (X, Y, Z, C) float32 on the stored grid, the label (uint8) or None, and the meta
    dict that maps arrays on that grid back to the input (``shape`` included; see
    :func:`restore_geometry`). ``prepare`` stores these; ``predict`` feeds them to the network.
    Raises DataError naming the file. Long: the six steps in order, a few lines each; apart they would
    hand a dozen arrays and geometry values from one to the next."""
    label_values = None if labels is None else set(labels.values())
    if rec.problem:
        raise DataError(rec.problem)
    try:
        fingerprint = source_fingerprint(rec)  # before reading: a file changed meanwhile is redone next time
    except OSError:
        fingerprint = None  # _load_checked names the missing file
    image, label, affine, _ = _load_checked(rec, label_values)
    where = rec.images[0]
    orig_shape = [int(s) for s in image.shape[:3]]
    try:
        img_ras, aff_ras, undo = to_canonical(image, affine)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    lab_ras = None if label is None else to_canonical(label, affine)[0]
    canon_shape = [int(s) for s in img_ras.shape[:3]]
    spacing_orig = canonical_spacing(affine)

    mask, box = _crop_box(img_ras, lab_ras)
    if not crop:  # registered volumes (DeepLesionBrain's MNI grid) keep their common shape
        box = [[0, int(n)] for n in img_ras.shape[:3]]
    sl = tuple(slice(a, b) for a, b in box)
    img_c = np.ascontiguousarray(img_ras[sl], dtype=np.float32)
    mask_c = mask[sl]
    lab_c = None if lab_ras is None else np.ascontiguousarray(lab_ras[sl])
    aff_crop = aff_ras.copy()
    aff_crop[:3, 3] = aff_ras[:3, :3] @ np.array([b[0] for b in box], dtype=np.float64) + aff_ras[:3, 3]

    means, stds = [], []
    for c in range(img_c.shape[-1]):
        ch = img_c[..., c]
        vals = ch[mask_c].astype(np.float64)
        mean = float(vals.mean()) if vals.size else 0.0
        std = float(vals.std()) if vals.size else 1.0
        std = max(std, 1e-8)
        out = ((ch.astype(np.float64) - mean) / std).astype(np.float32)
        out[~mask_c] = 0.0
        img_c[..., c] = out
        means.append(mean)
        stds.append(std)

    cropped_shape = [int(s) for s in img_c.shape[:3]]
    resampled = False
    spacing_after = list(spacing_orig)
    aff_store = aff_crop
    if target_spacing is not None:
        ts_ = np.asarray(target_spacing, dtype=np.float64)
        new_shape = [max(1, int(round(n * s / t))) for n, s, t in zip(cropped_shape, spacing_orig, ts_)]
        if float(np.prod(new_shape, dtype=np.float64)) > MAX_RESAMPLED_VOXELS:
            raise DataError(f"{where}: resampling {cropped_shape} voxels of {tuple(spacing_orig)} mm to "
                            f"{tuple(float(t) for t in ts_)} mm would give {new_shape} voxels "
                            f"(more than {MAX_RESAMPLED_VOXELS}); check the header's voxel size")
        if new_shape != cropped_shape:
            img_c = resample_image(img_c, new_shape)
            if lab_c is not None:
                lab_c = np.ascontiguousarray(_resample_nearest(lab_c, new_shape))
            aff_store = _resampled_affine(aff_crop, cropped_shape, new_shape)
            resampled = True
        spacing_after = [float(s * n / m) for s, n, m in zip(spacing_orig, cropped_shape, new_shape)]

    meta = {
        "case_id": rec.case_id,
        "source_images": [str(p) for p in rec.images],
        "source_label": None if rec.label is None else str(rec.label),
        "source": source,
        "source_fingerprint": fingerprint,
        "channel_names": list(channel_names),
        "original_affine": affine.tolist(),
        "original_shape": orig_shape,
        "original_orientation": "".join(aff2axcodes(affine)),
        "undo": undo,
        "canonical_affine": aff_ras.tolist(),
        "canonical_shape": canon_shape,
        "crop_box": box,
        "cropped_shape": cropped_shape,
        "spacing_original": [float(s) for s in spacing_orig],
        "spacing": [float(s) for s in spacing_after],
        "target_spacing": None if target_spacing is None else [float(s) for s in target_spacing],
        "resampled": resampled,
        "resampling": {"image": "spline order 3", "label": "nearest", "alignment": "pixel edges"}
        if resampled else None,
        "stored_affine": aff_store.tolist(),
        "normalization": {"scheme": "zscore_nonzero", "mean": means, "std": stds},
        "stratum": rec.stratum,
        "age": rec.age,
        "site": rec.site,
        "split": rec.split,
        "preprocessing_version": PREPROCESSING_VERSION,
        "shape": [int(s) for s in img_c.shape[:3]],
    }
    return img_c, lab_c, meta


def prepare_case(rec: CaseRecord, store_root: str | Path, *, labels: dict[str, int] | None,
                 channel_names: Sequence[str], target_spacing: Sequence[float] | None,
                 source: str = "", crop: bool = True) -> dict:
    """Check, preprocess and write one case (:func:`preprocess_case`, then the store); returns a short
    summary. Raises DataError."""
    t0 = time.perf_counter()
    image, label, meta = preprocess_case(rec, labels=labels, channel_names=channel_names,
                                         target_spacing=target_spacing, source=source, crop=crop)
    store.write_case(Path(store_root), rec.case_id, image, label, meta)
    return {"case_id": rec.case_id, "shape": list(image.shape[:3]), "seconds": time.perf_counter() - t0}


def _prepare_case_job(rec: CaseRecord, store_root: str, labels, channel_names, target_spacing, source,
                      crop=True):
    """Process-pool entry point: returns ("ok", summary) or ("bad", message)."""
    try:
        return "ok", prepare_case(rec, store_root, labels=labels, channel_names=channel_names,
                                  target_spacing=target_spacing, source=source, crop=crop)
    except DataError as exc:
        return "bad", str(exc)


# --------------------------------------------------------------------------- whole dataset


def _resolve_target(target_spacing, records, skip_bad: bool = False) -> tuple[float, float, float] | None:
    if target_spacing is None:
        return None
    if isinstance(target_spacing, str):
        if target_spacing != "median":
            raise DataError(f"target_spacing must be None, 'median' or 3 numbers, got {target_spacing!r}")
        good, bad = _header_spacings(records)
        if bad and not skip_bad:  # one absurd header would drag the median (and every case) with it
            raise DataError(f"target_spacing='median': {len(bad)} case(s) have an implausible voxel size "
                            f"(fix their headers, or --skip-bad to leave them out): " + "; ".join(bad))
        if not good:
            raise DataError("target_spacing='median': no readable image header to compute it from")
        med = tuple(float(v) for v in np.median(np.asarray([s for _, s in good]), axis=0))
        far = [f"{r.images[0]} ({', '.join(f'{v:.3g}' for v in s)} mm)" for r, s in good
               if max(max(a / b, b / a) for a, b in zip(s, med)) > SPACING_OUTLIER_FACTOR]
        if far:
            warnings.warn(f"target_spacing='median' = {', '.join(f'{v:.3g}' for v in med)} mm: "
                          f"{len(far)} case(s) are more than {SPACING_OUTLIER_FACTOR:g}x off it: " + "; ".join(far),
                          stacklevel=3)
        return med
    try:
        t = tuple(float(v) for v in target_spacing)
    except (TypeError, ValueError):
        t = ()
    if len(t) != 3 or not all(np.isfinite(t)) or min(t) <= 0:
        raise DataError(f"target_spacing must be 3 positive numbers (RAS axis order), got {target_spacing!r}")
    if not all(SPACING_MIN_MM <= v <= SPACING_MAX_MM for v in t):
        raise DataError(f"target_spacing {t} mm is implausible (allowed {SPACING_MIN_MM:g}..{SPACING_MAX_MM:g} mm "
                        f"per axis)")
    return t


def _settings(ds: Dataset, target, crop: bool = True) -> dict:
    return {
        "version": PREPROCESSING_VERSION,
        "orientation": "RAS",
        "crop": "nonzero_bbox" if crop else "none",
        "normalization": "zscore_nonzero",
        "target_spacing": None if target is None else [float(v) for v in target],
        "channel_names": list(ds.channel_names),
    }


def _same_settings(a: dict, b: dict) -> bool:
    if a.get("target_spacing") is None or b.get("target_spacing") is None:
        if (a.get("target_spacing") is None) != (b.get("target_spacing") is None):
            return False
    elif not np.allclose(a["target_spacing"], b["target_spacing"], rtol=1e-6, atol=1e-9):
        return False
    return all(a.get(k) == b.get(k) for k in ("version", "orientation", "crop", "normalization", "channel_names"))


def _dataset_meta(ds: Dataset, settings: dict, root: Path, status: str) -> dict:
    cases = store.list_cases(root)
    return {
        "name": ds.name,
        "source": str(ds.root),
        "source_format": ds.format,
        "labels": ds.labels,
        "channel_names": list(ds.channel_names),
        "spacing": settings["target_spacing"],
        "n_cases": len(cases),
        "preprocessing": settings,
        "status": status,
    }


def _check_store_matches(root: Path, ds, settings: dict) -> None:
    """Refuse a store prepared with other settings, from another dataset or with another label set."""
    ds_json = root / "dataset.json"  # for messages
    if not store.has_dataset_meta(root):
        return
    old = store.read_dataset_meta(root)
    if not _same_settings(old.get("preprocessing", {}), settings):
        raise DataError(
            f"{ds_json}: this store was prepared with different settings "
            f"({old.get('preprocessing')}) than now ({settings}); use another store_root")
    # Cases of two datasets must not mix under one label set.
    if old.get("source") not in (None, str(ds.root)):
        raise DataError(f"{ds_json}: this store holds cases prepared from {old['source']}, not "
                        f"{ds.root}; prepare into another --store (or delete {root} first)")
    if "labels" in old and old["labels"] != ds.labels:
        raise DataError(f"{ds_json}: this store was prepared with the labels {old['labels']}, the dataset "
                        f"now declares {ds.labels}; prepare into another --store (or delete {root} first)")


def _plan_cases(root: Path, records) -> tuple[list, list[str], list[dict]]:
    """(cases to prepare, stored cases to skip, stored cases whose source files changed, with why)."""
    done = set(store.list_cases(root))
    todo, skipped, redone = [], [], []
    for r in records:
        if r.case_id in done:
            why = _stale_reason(root, r)
            if why is None:
                skipped.append(r.case_id)
                continue
            redone.append({"case_id": r.case_id, "reason": why})
        todo.append(r)
    return todo, skipped, redone


def _run_jobs(todo, args: tuple, num_workers: int, executor: str, handle) -> None:
    """`_prepare_case_job(rec, *args)` for every record, in this process or a pool; `handle(rec, status,
    payload)` in completion order, here (it may raise: the pool is then shut down, pending jobs cancelled)."""
    if num_workers <= 1 or len(todo) <= 1:
        for rec in todo:
            handle(rec, *_prepare_case_job(rec, *args))
        return
    pool: Executor
    if executor == "process":
        pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=mp.get_context("spawn"))
    elif executor == "thread":
        pool = ThreadPoolExecutor(max_workers=num_workers)
    else:
        raise ValueError(f"executor must be 'process' or 'thread', got {executor!r}")
    try:
        futures: dict[Future, CaseRecord] = {pool.submit(_prepare_case_job, rec, *args): rec for rec in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                handle(futures[fut], *fut.result())
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def prepare(
    dataset_path: str | Path,
    store_root: str | Path,
    *,
    target_spacing: str | Sequence[float] | None = None,
    num_workers: int = 2,
    skip_bad: bool = False,
    executor: str = "process",
    splits: Sequence[str] | None = None,
    progress: bool = True,
    crop: bool = True,
    **reader_kwargs,
) -> dict:
    """Prepare every case of a dataset (folder or manifest, see :func:`read_dataset`) into the
    case store at ``store_root``; returns a report dict.

    ``target_spacing``: ``None`` (keep each case's spacing), ``"median"`` (the dataset's median
    spacing, from the headers) or 3 numbers in mm in RAS axis order. ``num_workers``: cases in
    parallel; ``<= 1`` runs in this process, otherwise a pool (``executor="process"``: spawned
    processes, the default; ``"thread"``: threads). ``splits``: only cases whose ``split`` is in
    it (``None``: all). ``crop=False`` keeps the whole (canonical) grid instead of cropping to the
    nonzero box, for volumes registered to a common space. ``reader_kwargs`` go to :func:`read_manifest` (``channels=``, ``labels=``).

    Cases already complete in the store are skipped while their source files' fingerprint (path,
    size, mtime; :func:`source_fingerprint`) matches the one recorded in their ``meta.json``;
    otherwise they are prepared again and listed in ``redone`` with the reason. A store prepared
    from another dataset (``source``) or with another label set is refused. ``skip_bad=False``: the
    first bad case raises :class:`DataError` (cases written before stay valid). ``skip_bad=True``: bad cases are
    rejected and listed, with the reason, in ``store_root/rejected.json`` and the report.

    Report keys: ``store_root``, ``source``, ``n_total``, ``prepared``, ``skipped_existing``,
    ``redone`` ([{"case_id", "reason"}]), ``rejected`` ([{"case_id", "reason"}]), ``target_spacing``, ``seconds``.

    Long for its docstring (the store's contract); the steps are the helpers above.
    """
    t0 = time.perf_counter()
    root = Path(store_root)
    ds = read_dataset(dataset_path, strict=not skip_bad, **reader_kwargs)
    records = [r for r in ds.cases if splits is None or r.split in set(splits)]
    target = _resolve_target(target_spacing, records, skip_bad)
    settings = _settings(ds, target, crop)

    root.mkdir(parents=True, exist_ok=True)
    store.remove_stale_temp(root)
    _check_store_matches(root, ds, settings)
    store.write_dataset_meta(root, _dataset_meta(ds, settings, root, "in progress"))

    todo, skipped, redone = _plan_cases(root, records)
    stale = {d["case_id"] for d in redone}
    prepared: list[str] = []
    rejected: list[dict] = []
    args = (str(root), ds.labels, list(ds.channel_names), target, str(ds.root), crop)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="case", desc="prepare", disable=not progress, dynamic_ncols=True)

    def handle(rec: CaseRecord, status: str, payload) -> None:
        if status == "ok":
            prepared.append(rec.case_id)
        else:
            if not skip_bad:
                raise DataError(payload)
            if rec.case_id in stale:  # its old stored copy no longer matches the sources
                shutil.rmtree(root / rec.case_id, ignore_errors=True)
            rejected.append({"case_id": rec.case_id, "reason": payload})
        bar.update(1)
        bar.set_postfix(rejected=len(rejected), refresh=False)

    try:
        _run_jobs(todo, args, num_workers, executor, handle)
    finally:
        bar.close()
        store.write_dataset_meta(root, _dataset_meta(ds, settings, root, "in progress"))

    rejected.sort(key=lambda r: r["case_id"])
    if skip_bad:
        store.write_rejected(root, {"source": str(ds.root), "rejected": rejected})
    store.write_dataset_meta(root, _dataset_meta(ds, settings, root, "complete"))
    return {
        "store_root": str(root),
        "source": str(ds.root),
        "n_total": len(records),
        "prepared": sorted(prepared),
        "skipped_existing": sorted(skipped),
        "redone": sorted(redone, key=lambda r: r["case_id"]),
        "rejected": rejected,
        "target_spacing": None if target is None else list(target),
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- back to the input grid


def restore_geometry(pred_cropped: np.ndarray, meta: dict) -> np.ndarray:
    """Map an array on the stored grid (e.g. a predicted label map, spatial shape
    ``meta["shape"]``, optional trailing axes) back to the original voxel grid: undo the
    resampling (nearest), the crop (pad with 0) and the reorientation. The result, written with
    ``meta["original_affine"]``, overlays the input image in any NIfTI viewer.
    """
    pred = np.asarray(pred_cropped)
    stored = tuple(int(s) for s in meta["shape"])
    if tuple(pred.shape[:3]) != stored:
        raise ValueError(f"restore_geometry: array spatial shape {pred.shape[:3]} != stored shape {stored}")
    cropped = tuple(int(s) for s in meta["cropped_shape"])
    if meta.get("resampled") and cropped != stored:
        pred = _resample_nearest(pred, cropped)
    full = np.zeros((*meta["canonical_shape"], *pred.shape[3:]), dtype=pred.dtype)
    full[tuple(slice(a, b) for a, b in meta["crop_box"])] = pred
    return from_canonical(full, meta["undo"])
