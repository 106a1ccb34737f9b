"""Predict label maps for NIfTI images: preprocessing, sliding window, back to the input grid.

Per case (:func:`predict_case`):

1. preprocess the input channels exactly as training data were: :func:`jaxseg.data.prepare.
   preprocess_case` (load with checks, reorient to RAS, crop to the nonzero box, z-score over the
   nonzero voxels, optional resampling to the training spacing), arrays in memory;
2. sliding-window logits (:func:`jaxseg.inference.sliding_window.sliding_window_logits`),
   averaged over the given apply_fns (fold ensemble) and mirror passes;
3. when the case was resampled: the logits go back to the cropped grid by linear interpolation
   (``logits_resample_order=1``, nnU-Net v2 resamples logits before the argmax too; 0 = argmax
   first, then nearest);
4. argmax -> label map; :func:`jaxseg.data.prepare.restore_geometry` un-crops (background 0)
   and un-reorients it;
5. :func:`jaxseg.data.io.save_nifti` writes it atomically with the first input file's affine
   (so it has exactly the input's shape and affine, oblique and non-RAS inputs included) and
   its header as a template (qform/sform codes, units).

Optional probabilities (softmax of the mean logits, class axis last, on the input grid;
voxels outside the crop box are background with probability 1): ``save_probabilities="nifti"``
writes ``<name>_probabilities.nii.gz`` as a float32 4D NIfTI (NIfTI-1 has no float16 type);
``"npz"`` writes ``<name>_probabilities.npz`` with a float16 array ``probabilities``
(nnU-Net also saves probabilities as .npz).

:func:`predict_folder` runs this over an nnU-Net raw folder (``dataset.json``), a CSV manifest
(see :func:`jaxseg.data.datasets.read_dataset`) or a plain folder of ``CASE_XXXX.nii.gz``
channel files (nnU-Net's ``imagesTs`` layout; single-channel files without the suffix also
work). Bad inputs raise :class:`jaxseg.data.io.DataError` naming the file.
"""

from __future__ import annotations

import csv
import io as _io
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.fileio import atomic_path, write_text_atomic
from jaxseg.data import store
from jaxseg.data.datasets import CaseRecord, read_dataset
from jaxseg.data.io import DataError, load_header, save_nifti
from jaxseg.data.prepare import preprocess_case, resample_image, restore_geometry
from jaxseg.inference.sliding_window import average_apply_fns, sliding_window_logits

__all__ = [
    "Prediction",
    "Predictions",
    "make_apply_fn",
    "inference_kwargs",
    "predict_case",
    "predict_preprocessed",
    "predict_stored_case",
    "predict_folder",
    "find_cases",
]

class Prediction(NamedTuple):
    """What a prediction wrote: the label map ``path``, the mean window ``age`` (AgeU-Net) or
    None, and the ``probabilities`` file or None; ``kept``: the files were already there
    (``skip_existing``) and were not written again."""

    case_id: str
    path: Path
    age: float | None = None
    probabilities: Path | None = None
    kept: bool = False


class Predictions(list):
    """:func:`predict_folder`'s result: a list of :class:`Prediction` plus ``failed``, case id ->
    message of the cases skipped with ``skip_bad``."""

    def __init__(self, items=(), failed=None):
        super().__init__(items)
        self.failed: dict[str, str] = dict(failed or {})


# --------------------------------------------------------------------------- model -> apply_fn


def _forward(model, head: int, variables, x):
    out = model.apply(variables, x.astype(jnp.float32))
    if hasattr(out, "seg"):
        seg, age = out.seg, out.age
        seg = seg[head] if isinstance(seg, (list, tuple)) else seg
    elif isinstance(out, (tuple, list)):
        seg, age = out[0], (out[1] if len(out) > 1 else None)
    else:
        seg, age = out, None
    return seg.astype(jnp.float32), (None if age is None else jnp.reshape(age, (x.shape[0],)).astype(jnp.float32))


# One compiled program per (model, head, input shape), shared by every parameter set (fold) of the
# same model; the variables are an argument, never baked into the program as constants.
_forward_jit = jax.jit(_forward, static_argnums=(0, 1))


def make_apply_fn(model, variables, *, head: int = 0) -> Callable:
    """A jitted apply_fn for :func:`sliding_window_logits`: windows (n, X, Y, Z, C) -> logits of
    the highest-resolution segmentation head ``seg[head]`` (n, X, Y, Z, K) float32, or
    ``(logits, age (n,))`` when the model has an age head. Works for :class:`UNet3D` (output
    ``UNetOutput``) and for models returning plain logits (DeepLesionBrain's compact U-Net, evaluated with
    dropout off). ``variables``: the full variables dict (``{"params": ...}``)."""
    if "params" not in variables:
        raise ValueError("variables must be a Flax variables dict with a 'params' entry")

    def apply_fn(x):
        logits, age = _forward_jit(model, int(head), variables, x)
        return logits if age is None else (logits, age)

    apply_fn.model = model  # type: ignore[attr-defined]
    apply_fn.variables = variables  # type: ignore[attr-defined]
    return apply_fn


def inference_kwargs(cfg, model=None, preprocessing: dict | None = None) -> dict:
    """Keyword arguments for :func:`predict_case` / :func:`predict_folder` from a config:
    patch size (the model topology's padded patch when ``model`` has one), number of classes and
    channels, step, Gaussian sigma, window batch, mirror axes (all three with
    ``eval.mirror_tta``), and from ``preprocessing`` (a run directory's preprocessing.json, see
    :mod:`jaxseg.rundir`) the target spacing the training cases were resampled to (None = not
    resampled) and the channel names."""
    patch = tuple(cfg.data.patch_size)
    topo = getattr(model, "topology", None)
    if topo is not None and getattr(topo, "patch_size", None) is not None:
        patch = tuple(topo.patch_size)
    kw = dict(patch_size=patch, num_classes=int(cfg.data.num_classes), num_channels=int(cfg.data.num_channels),
              step=float(cfg.eval.step_size), sigma_scale=float(cfg.eval.gaussian_sigma),
              window_batch=int(cfg.eval.window_batch), mirror_axes=(0, 1, 2) if cfg.eval.mirror_tta else (),
              target_spacing=None)
    if preprocessing is not None:
        ts_ = preprocessing.get("target_spacing")
        kw["target_spacing"] = None if ts_ is None else tuple(float(v) for v in ts_)
        if preprocessing.get("channel_names"):
            kw["channel_names"] = list(preprocessing["channel_names"])
    return kw


# --------------------------------------------------------------------------- helpers


def _nifti_stem(path: Path) -> tuple[str, str]:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)], name[-len(ext):]
    raise ValueError(f"{path}: the output must be a .nii or .nii.gz file")


def _case_id_from(path: Path) -> str:
    stem = path.name
    for ext in (".nii.gz", ".nii"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    return re.sub(r"_\d{4}$", "", stem)


def _label_dtype(max_value: int):
    return np.uint8 if max_value <= 255 else np.int16 if max_value <= 32767 else np.int32


def _header_template(path: Any):
    """The input's header, with the display range and description reset (a label map is not
    shown with the image's window)."""
    try:
        _, _, hdr = load_header(path)
    except (DataError, TypeError):
        return None
    hdr = hdr.copy()
    hdr["cal_min"] = 0
    hdr["cal_max"] = 0
    hdr["descrip"] = b"jaxseg prediction"
    return hdr


def _write_npz_atomic(path: Path, **arrays) -> None:
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def _softmax_inplace(logits: np.ndarray) -> np.ndarray:
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    return logits


# --------------------------------------------------------------------------- one case


def predict_preprocessed(
    apply_fns: Callable | Sequence[Callable],
    image: np.ndarray,
    meta: dict,
    out_path: str | os.PathLike,
    *,
    patch_size: Sequence[int],
    num_classes: int,
    step: float = 0.5,
    sigma_scale: float = 1.0 / 8,
    window_batch: int = 4,
    mirror_axes: Sequence[int] = (),
    accumulate: str = "auto",
    logits_resample_order: int = 1,
    class_values: Sequence[int] | None = None,
    save_probabilities: str | None = None,
    header: Any = "auto",
    progress: bool = False,
) -> Prediction:
    """Predict a case that is already preprocessed: ``image`` (X, Y, Z, C) on the stored grid and
    its ``meta`` (as written by ``prepare_case``: original affine/shape, undo, crop box,
    resampling). Writes the label map on the original grid to ``out_path``; see the module
    docstring. ``class_values``: the label value of each class index (default: the index).
    ``header``: NIfTI header template (``"auto"``: the first source image's, when readable)."""
    out_path = Path(out_path)
    stem, suffix = _nifti_stem(out_path)
    if save_probabilities not in (None, "nifti", "npz"):
        raise ValueError(f"save_probabilities must be None, 'nifti' or 'npz', got {save_probabilities!r}")
    if logits_resample_order not in (0, 1, 2, 3):
        raise ValueError(f"logits_resample_order must be 0..3, got {logits_resample_order!r}")
    sources = [Path(p).resolve() for p in meta.get("source_images", [])]
    if out_path.resolve() in sources:
        raise DataError(f"{out_path}: the output path is one of the input images; refusing to overwrite it")
    lut = None
    if class_values is not None:
        lut = np.asarray([int(v) for v in class_values])
        if lut.shape != (int(num_classes),):
            raise ValueError(f"class_values has {lut.size} entries, num_classes is {num_classes}")
    stored_shape = tuple(int(s) for s in meta["shape"])
    if tuple(np.shape(image)[:3]) != stored_shape:
        raise ValueError(f"image spatial shape {np.shape(image)[:3]} != meta shape {stored_shape}")

    logits, extra = sliding_window_logits(
        average_apply_fns(apply_fns), image, patch_size, num_classes, step=step, sigma_scale=sigma_scale,
        window_batch=window_batch, mirror_axes=mirror_axes, accumulate=accumulate, progress=progress)

    cropped = tuple(int(s) for s in meta.get("cropped_shape", stored_shape))
    if meta.get("resampled") and cropped != stored_shape and logits_resample_order > 0:
        logits = resample_image(logits, cropped, order=int(logits_resample_order))
        meta = dict(meta, shape=list(cropped), resampled=False)

    seg = np.argmax(logits, axis=-1)
    if lut is not None:
        seg = lut[seg]
    seg = seg.astype(_label_dtype(int(seg.max()) if seg.size else 0))
    labels = restore_geometry(seg, meta)
    affine = np.asarray(meta["original_affine"], dtype=np.float64)
    if tuple(labels.shape) != tuple(int(s) for s in meta["original_shape"]):  # restore_geometry guarantees it
        raise AssertionError((labels.shape, meta["original_shape"]))
    if isinstance(header, str) and header == "auto":
        header = _header_template(sources[0]) if sources and sources[0].is_file() else None
    save_nifti(out_path, labels, affine, header)

    prob_path = None
    if save_probabilities is not None:
        probs = _softmax_inplace(logits)
        inside = restore_geometry(np.ones(probs.shape[:3], dtype=bool), meta)
        full = restore_geometry(probs, meta)
        full[~inside, 0] = 1.0
        if save_probabilities == "nifti":
            prob_path = out_path.with_name(f"{stem}_probabilities{suffix}")
            save_nifti(prob_path, full, affine, header, dtype=np.float32)
        else:
            prob_path = out_path.with_name(f"{stem}_probabilities.npz")
            _write_npz_atomic(prob_path, probabilities=full.astype(np.float16), affine=affine)
    return Prediction(str(meta.get("case_id", stem)), out_path, extra["age"], prob_path)


def predict_case(
    apply_fns: Callable | Sequence[Callable],
    image_paths: str | os.PathLike | Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    patch_size: Sequence[int],
    num_classes: int,
    target_spacing: Sequence[float] | None = None,
    channel_names: Sequence[str] | None = None,
    num_channels: int | None = None,
    case_id: str | None = None,
    **kwargs,
) -> Prediction:
    """Predict one case from its NIfTI channel files (channel order) and write the label map to
    ``out_path`` (.nii / .nii.gz) on the input's voxel grid, with the input's affine.

    Preprocessing is ``preprocess_case``'s, as ``prepare`` did for training (``target_spacing``: the
    spacing the training cases were resampled to, RAS axis order, None = no resampling; see
    :func:`inference_kwargs`). ``num_channels``: when given, the number of files must match. Other
    keyword arguments go to :func:`predict_preprocessed` (``step``, ``sigma_scale``, ``window_batch``,
    ``mirror_axes``, ``accumulate``, ``logits_resample_order``, ``class_values``,
    ``save_probabilities``, ``progress``). Returns a :class:`Prediction` (``age``: mean window age,
    AgeU-Net)."""
    if isinstance(image_paths, (str, os.PathLike)):
        image_paths = [image_paths]
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise DataError(f"{out_path}: no input image given")
    if num_channels is not None and len(paths) != int(num_channels):
        raise DataError(f"{paths[0]}: {len(paths)} channel file(s) given, the model expects {num_channels}: "
                        f"{[str(p) for p in paths]}")
    names = list(channel_names) if channel_names is not None else [f"channel_{i}" for i in range(len(paths))]
    if len(names) != len(paths):
        raise DataError(f"{paths[0]}: {len(paths)} channel file(s) but {len(names)} channel names {names}")
    cid = case_id or _case_id_from(paths[0])
    _nifti_stem(Path(out_path))  # check the output name before any work
    image, _, meta = preprocess_case(CaseRecord(cid, [p.resolve() for p in paths]), labels=None,
                                     channel_names=names, target_spacing=target_spacing, source="predict")
    return predict_preprocessed(apply_fns, image, meta, out_path, patch_size=patch_size,
                                num_classes=num_classes, **kwargs)


def predict_stored_case(apply_fns: Callable | Sequence[Callable], store_root: str | os.PathLike, case_id: str,
                        out_path: str | os.PathLike, **kwargs) -> Prediction:
    """Predict a case of a prepared case store (e.g. a held-out split) and write it on the
    original image grid; ``kwargs`` as for :func:`predict_preprocessed`."""
    case = store.open_case(Path(store_root), case_id)
    return predict_preprocessed(apply_fns, case.read_image(), case.meta, out_path, **kwargs)


# --------------------------------------------------------------------------- a folder of cases

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})(?P<ext>\.nii\.gz|\.nii)$", re.IGNORECASE)


def find_cases(path: str | os.PathLike, *, splits: Sequence[str] | None = None, **reader_kwargs
               ) -> list[CaseRecord]:
    """The cases to predict from ``path``: an nnU-Net raw folder (``dataset.json``; ``splits``
    e.g. ``["test"]`` selects ``imagesTs``) or a CSV manifest (both via ``read_dataset``), or a
    plain folder of ``CASE_XXXX.nii.gz`` channel files (or, when no file has a channel suffix,
    one single-channel case per ``.nii``/``.nii.gz`` file)."""
    path = Path(path)
    if path.is_file() or (path.is_dir() and (path / "dataset.json").is_file()) or not path.exists():
        ds = read_dataset(path, **reader_kwargs)
        recs = [r for r in ds.cases if splits is None or r.split in set(splits)]
        return [CaseRecord(r.case_id, list(r.images), None, r.stratum, r.age, r.site, r.split) for r in recs]
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and not p.name.startswith(".") and re.search(r"\.nii(\.gz)?$", p.name, re.I))
    if not files:
        raise DataError(f"{path}: no .nii / .nii.gz images in this folder")
    matched = {p: _CHANNEL_FILE.match(p.name) for p in files}
    if not any(matched.values()):
        return [CaseRecord(_case_id_from(p), [p.resolve()]) for p in files]
    odd = [p.name for p, m in matched.items() if m is None]
    if odd:
        raise DataError(f"{path}: files without the channel suffix CASE_XXXX.nii.gz next to ones with it: {odd[:5]}")
    groups: dict[str, dict[int, Path]] = {}
    for p, m in matched.items():
        groups.setdefault(m.group("case"), {})[int(m.group("ch"))] = p.resolve()
    n = max(len(g) for g in groups.values())
    records = []
    for cid, chans in sorted(groups.items()):
        missing = [c for c in range(n) if c not in chans]
        if missing or len(chans) != n:
            raise DataError(f"{path}: case {cid!r} has channel files {sorted(chans)}; expected 0..{n - 1} "
                            f"(missing {missing})")
        records.append(CaseRecord(cid, [chans[c] for c in range(n)]))
    return records


def _read_ages_csv(path: Path) -> dict[str, float]:
    try:
        with open(path, newline="") as f:
            return {r["case"]: float(r["predicted_age"]) for r in csv.DictReader(f)}
    except (OSError, KeyError, ValueError):
        return {}


def _write_ages_csv(path: Path, preds: Sequence[Prediction]) -> None:
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case", "predicted_age"])
    for p in preds:
        if p.age is not None:
            w.writerow([p.case_id, f"{p.age:.6g}"])
    write_text_atomic(path, buf.getvalue())


def predict_folder(
    apply_fns: Callable | Sequence[Callable],
    input: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    splits: Sequence[str] | None = None,
    file_ending: str = ".nii.gz",
    skip_existing: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
    reader_kwargs: dict | None = None,
    **kwargs,
) -> list[Prediction]:
    """Predict every case of ``input`` (see :func:`find_cases`) into ``out_dir/<case><file_ending>``.

    ``kwargs`` go to :func:`predict_case` (``patch_size``, ``num_classes``, ``target_spacing``,
    ``mirror_axes``, ...). ``skip_existing``: keep outputs that already exist (writes are atomic,
    so an existing file is complete; with ``save_probabilities`` the probability file must exist
    too; their ``age`` comes from an existing ``ages.csv``, else None). ``skip_bad``: a case
    raising :class:`DataError` is reported with a warning and left out instead of stopping the run.
    Returns a :class:`Predictions` (one :class:`Prediction` per written or kept case, ``.failed``:
    the skipped bad cases); when the model predicts ages they are also written to
    ``out_dir/ages.csv``.
    """
    if file_ending not in (".nii.gz", ".nii"):
        raise ValueError(f"file_ending must be '.nii.gz' or '.nii', got {file_ending!r}")
    records = find_cases(input, splits=splits, **(reader_kwargs or {}))
    if not records:
        raise DataError(f"{input}: no cases to predict" + (f" in splits {list(splits)}" if splits else ""))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fns = average_apply_fns(apply_fns)  # one wrapper for all cases

    from tqdm.auto import tqdm

    results = Predictions()
    failed = results.failed
    old_ages = _read_ages_csv(out / "ages.csv") if skip_existing else {}
    probs = kwargs.get("save_probabilities")
    bar = tqdm(records, desc="predict", unit="case", disable=not progress, dynamic_ncols=True)
    for rec in bar:
        target = out / f"{rec.case_id}{file_ending}"
        prob = (None if probs is None else
                out / (f"{rec.case_id}_probabilities{file_ending}" if probs == "nifti"
                       else f"{rec.case_id}_probabilities.npz"))
        if skip_existing and target.is_file() and (prob is None or prob.is_file()):
            results.append(Prediction(rec.case_id, target, old_ages.get(rec.case_id), prob, kept=True))
            continue
        try:
            results.append(predict_case(fns, rec.images, target, case_id=rec.case_id, **kwargs))
        except DataError as exc:
            if not skip_bad:
                raise
            failed[rec.case_id] = str(exc)
            warnings.warn(f"case {rec.case_id!r} skipped: {exc}")
        bar.set_postfix(failed=len(failed), refresh=False)
    bar.close()
    if any(p.age is not None for p in results):
        _write_ages_csv(out / "ages.csv", results)
    return results
