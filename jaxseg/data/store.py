"""The case store: preprocessed cases as tensorstore zarr arrays, one folder per case.

On-disk layout::

    root/
      dataset.json                 write_dataset_meta / read_dataset_meta (labels, channel names,
                                   spacing, number of cases, source, preprocessing settings)
      rejected.json                (prepare(skip_bad=True) only) rejected cases and reasons
      <case_id>/                   exists only when complete (built elsewhere, then renamed)
        image.zarr/                zarr v2, float32 (X, Y, Z, C) channels-last,
                                   chunks (32, 32, 32, C), blosc/zstd level 5, byte shuffle
        label.zarr/                zarr v2, uint8 (X, Y, Z), chunks (32, 32, 32), blosc/zstd
                                   (absent for unlabelled cases)
        fg.npz                     class_<c>: int32 (k, 3) voxel coordinates of class c, k <= 10000,
                                   sampled without replacement with a fixed seed (foreground
                                   oversampling, as nnU-Net's class_locations)
        meta.json                  caller's meta + shape, n_channels, dtype, label_dtype,
                                   has_label, classes_present, fg_samples
      .tmp-<case_id>-<pid>/        a case being written (ignored by list_cases)

A case is written under ``root/.tmp-<case_id>-<pid>/`` and moved to ``root/<case_id>`` with
``os.replace`` as the last step, so a case folder exists only when it is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from jaxseg.fileio import json_default, write_json_atomic

__all__ = [
    "StoredCase",
    "write_case",
    "list_cases",
    "open_case",
    "read_patch",
    "write_dataset_meta",
    "has_dataset_meta",
    "read_dataset_meta",
    "read_case_meta",
    "write_rejected",
    "content_fingerprint",
    "median_spacing",
    "check_for_training",
    "remove_stale_temp",
    "FG_MAX_SAMPLES",
    "FG_SEED",
    "CHUNK",
]

CHUNK = 32
FG_MAX_SAMPLES = 10000
FG_SEED = 1234
_COMPRESSOR = {"id": "blosc", "cname": "zstd", "clevel": 5, "shuffle": 1}
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _case_lock(root: Path, case_id: str) -> threading.Lock:
    key = f"{os.path.abspath(root)}::{case_id}"
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _check_case_id(case_id: str) -> None:
    if (not isinstance(case_id, str) or not case_id or case_id.startswith(".")
            or "/" in case_id or "\\" in case_id or case_id in ("dataset.json", "rejected.json")):
        raise ValueError(f"invalid case id {case_id!r} (non-empty, no '/', not starting with '.')")


def _zarr_spec(path: Path, shape: Sequence[int], dtype: str, chunks: Sequence[int]) -> dict:
    return {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "zarr_format": 2,
            "shape": [int(s) for s in shape],
            "chunks": [int(c) for c in chunks],
            "dtype": dtype,
            "compressor": dict(_COMPRESSOR),
            "fill_value": 0,
            "order": "C",
        },
        "create": True,
        "delete_existing": True,
    }


def _fg_locations(label: np.ndarray, seed: int = FG_SEED, max_samples: int = FG_MAX_SAMPLES
                  ) -> dict[int, np.ndarray]:
    """For each foreground class present: up to ``max_samples`` voxel coordinates (int32, (k, 3)),
    drawn without replacement with a fixed seed, sorted (C order)."""
    rng = np.random.default_rng(seed)
    out: dict[int, np.ndarray] = {}
    for c in np.unique(label):
        c = int(c)
        if c == 0:
            continue
        flat = np.flatnonzero(label.reshape(-1) == c)
        if flat.size > max_samples:
            flat = np.sort(rng.choice(flat, size=max_samples, replace=False))
        out[c] = np.stack(np.unravel_index(flat, label.shape), axis=1).astype(np.int32)
    return out


def write_case(root: Path, case_id: str, image: np.ndarray, label: np.ndarray | None, meta: dict) -> None:
    """Write one case atomically (layout in the module docstring).

    ``image``: float32 (X, Y, Z, C), channels last. ``label``: uint8 (X, Y, Z) or ``None``.
    ``meta``: any JSON-serialisable dict (numpy scalars/arrays are converted); shape,
    n_channels, dtype, classes_present (and a few more) are added. An existing case of the same
    id is replaced.
    """
    root = Path(root)
    _check_case_id(case_id)
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(f"case {case_id!r}: image must be (X, Y, Z, C), got shape {image.shape}")
    if image.dtype != np.float32:
        if image.dtype.kind not in "biuf":
            raise ValueError(f"case {case_id!r}: image dtype {image.dtype} is not numeric")
        image = image.astype(np.float32)
    if not np.all(np.isfinite(image)):
        raise ValueError(f"case {case_id!r}: image has non-finite values")
    shape = tuple(int(s) for s in image.shape[:3])
    n_channels = int(image.shape[3])
    if label is not None:
        label = np.asarray(label)
        if label.shape != shape:
            raise ValueError(f"case {case_id!r}: label shape {label.shape} != image shape {shape}")
        if label.dtype != np.uint8:
            if label.dtype.kind not in "biu" or (label.size and (label.min() < 0 or label.max() > 255)):
                raise ValueError(f"case {case_id!r}: label must be uint8-compatible, got {label.dtype}")
            label = label.astype(np.uint8)

    root.mkdir(parents=True, exist_ok=True)
    final = root / case_id
    tmp = root / f"{_TMP_PREFIX}{case_id}-{os.getpid()}"
    with _case_lock(root, case_id):
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            tmp.mkdir()
            img_ts = ts.open(_zarr_spec(tmp / "image.zarr", image.shape, "<f4",
                                        (CHUNK, CHUNK, CHUNK, n_channels))).result()
            img_ts.write(np.ascontiguousarray(image)).result()
            fg: dict[int, np.ndarray] = {}
            if label is not None:
                lab_ts = ts.open(_zarr_spec(tmp / "label.zarr", shape, "|u1", (CHUNK, CHUNK, CHUNK))).result()
                lab_ts.write(np.ascontiguousarray(label)).result()
                fg = _fg_locations(label)
            with open(tmp / "fg.npz", "wb") as f:
                np.savez(f, **{f"class_{c}": v for c, v in fg.items()})
            full_meta = dict(meta)
            full_meta.update(
                case_id=case_id,
                shape=list(shape),
                n_channels=n_channels,
                dtype="float32",
                label_dtype="uint8" if label is not None else None,
                has_label=label is not None,
                classes_present=sorted(fg),
                fg_samples={str(c): int(len(v)) for c, v in fg.items()},
                chunks=[CHUNK, CHUNK, CHUNK],
            )
            with open(tmp / "meta.json", "w") as f:
                json.dump(full_meta, f, indent=1, default=json_default)
                f.write("\n")
            old = None
            if final.exists():
                old = root / f"{_OLD_PREFIX}{case_id}-{os.getpid()}"
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def list_cases(root: Path) -> list[str]:
    """Sorted ids of the complete cases under ``root`` (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "meta.json").is_file()
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp(root: Path) -> list[str]:
    """Delete temporary folders left by killed writers (``.tmp-*`` / ``.old-*`` whose process
    is gone). Returns the removed names. Folders of live processes are left alone."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        prefix = next((x for x in (_TMP_PREFIX, _OLD_PREFIX) if p.name.startswith(x)), None)
        if prefix is None or not p.is_dir():
            continue
        try:
            case_id, pid_s = p.name[len(prefix):].rsplit("-", 1)
            pid = int(pid_s)
        except ValueError:
            continue
        if pid != os.getpid() and _pid_alive(pid):
            continue
        if pid == os.getpid() and _case_lock(root, case_id).locked():
            continue  # being written by a thread of this process
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


@dataclass
class StoredCase:
    """An opened case: ``image`` (X, Y, Z, C) and ``label`` (X, Y, Z) are open tensorstores
    (read lazily), ``fg`` maps class -> (k, 3) int32 voxel coordinates."""

    case_id: str
    meta: dict
    shape: tuple[int, int, int]
    n_channels: int
    image: Any
    label: Any | None
    fg: dict[int, np.ndarray] = field(default_factory=dict)
    path: Path | None = None

    def read_image(self) -> np.ndarray:
        """The whole image (X, Y, Z, C) float32."""
        return np.asarray(self.image.read().result())

    def read_label(self) -> np.ndarray | None:
        """The whole label map (X, Y, Z) uint8, or None for an unlabelled case."""
        return None if self.label is None else np.asarray(self.label.read().result())


def _open_zarr(path: Path, context: Any = None):
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}
    kwargs = {"open": True, "read": True}
    if context is not None:
        kwargs["context"] = context
    return ts.open(spec, **kwargs).result()


def open_case(root: Path, case_id: str, *, context: Any = None) -> StoredCase:
    """Open a complete case for reading. ``context``: an optional ``tensorstore.Context``
    (e.g. with a shared cache pool) used for both arrays."""
    root = Path(root)
    _check_case_id(case_id)
    d = root / case_id
    if not (d / "meta.json").is_file():
        raise FileNotFoundError(f"{d}: no such complete case in the store {root}")
    with open(d / "meta.json") as f:
        meta = json.load(f)
    image = _open_zarr(d / "image.zarr", context)
    label = _open_zarr(d / "label.zarr", context) if (d / "label.zarr").exists() else None
    fg: dict[int, np.ndarray] = {}
    with np.load(d / "fg.npz") as z:
        for k in z.files:
            fg[int(k.split("_", 1)[1])] = z[k]
    shape = tuple(int(s) for s in image.shape[:3])
    return StoredCase(case_id, meta, shape, int(image.shape[3]), image, label, fg, d)


def read_patch(case: StoredCase, start: Sequence[int], size: Sequence[int]
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Read the box ``[start, start + size)``: image (sx, sy, sz, C) float32 and label
    (sx, sy, sz) uint8 (``None`` for unlabelled cases).

    ``start`` may be negative and ``start + size`` may exceed the shape; voxels outside the volume
    are 0 in both. Only the in-bounds part of the box is requested from tensorstore.
    """
    start = [int(s) for s in start]
    size = [int(s) for s in size]
    if len(start) != 3 or len(size) != 3 or any(s < 0 for s in size):
        raise ValueError(f"read_patch needs 3D start and non-negative 3D size, got {start}, {size}")
    img = np.zeros((*size, case.n_channels), dtype=np.float32)
    lab = None if case.label is None else np.zeros(size, dtype=np.uint8)
    lo = [max(s, 0) for s in start]
    hi = [min(s + n, dim) for s, n, dim in zip(start, size, case.shape)]
    if all(h > l for l, h in zip(lo, hi)):
        src = tuple(slice(l, h) for l, h in zip(lo, hi))
        dst = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))
        fut_img = case.image[src].read()
        fut_lab = None if case.label is None else case.label[src].read()
        img[dst] = fut_img.result()
        if fut_lab is not None:
            lab[dst] = fut_lab.result()
    return img, lab


def has_dataset_meta(root: Path) -> bool:
    return (Path(root) / "dataset.json").is_file()


def write_dataset_meta(root: Path, meta: dict) -> None:
    """Write ``root/dataset.json`` atomically (labels, channel_names, spacing, n_cases, source...)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "dataset.json", meta)


def read_dataset_meta(root: Path) -> dict:
    """Read ``root/dataset.json``."""
    path = Path(root) / "dataset.json"
    with open(path) as f:
        return json.load(f)


def write_rejected(root: Path, meta: dict) -> None:
    """Write ``root/rejected.json`` atomically (prepare's rejected cases and reasons)."""
    write_json_atomic(Path(root) / "rejected.json", meta)


def content_fingerprint(root: Path) -> str:
    """sha256 of what training reads from the store: the preprocessing settings and labels in
    dataset.json, and every complete case's id and meta.json (which names its source files' sizes and
    mtimes). The store's own path is not in it: a moved store keeps its fingerprint."""
    root = Path(root)
    meta = read_dataset_meta(root)
    h = hashlib.sha256(json.dumps({k: meta.get(k) for k in ("preprocessing", "labels", "channel_names")},
                                  sort_keys=True).encode())
    for cid in list_cases(root):
        h.update(cid.encode() + b"\0" + (root / cid / "meta.json").read_bytes())
    return h.hexdigest()


def median_spacing(root: Path) -> list[float] | None:
    """Median voxel spacing (mm, RAS axis order) of the stored cases, after any resampling; None when the
    store has no case."""
    sp = [read_case_meta(root, c).get("spacing") for c in list_cases(root)]
    sp = [s for s in sp if s is not None]
    return None if not sp else [float(v) for v in np.median(np.asarray(sp, dtype=np.float64), axis=0)]


def read_case_meta(root: Path, case_id: str) -> dict:
    """Read ``root/<case_id>/meta.json``; FileNotFoundError naming it when the case is not complete."""
    _check_case_id(case_id)
    path = Path(root) / case_id / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: case {case_id!r} is not a complete case of the store {root}")
    with open(path) as f:
        return json.load(f)


def _prepare_command(root: Path, meta: dict) -> str:
    """The `prepare` command line that (re)builds this store from its recorded settings."""
    pre = meta.get("preprocessing") or {}
    cmd = f"python -m jaxseg.launch prepare --dataset {meta.get('source', 'DATASET')} --store {root}"
    if pre.get("target_spacing") is not None:
        cmd += " --spacing " + ",".join(f"{v:g}" for v in pre["target_spacing"])
    if pre.get("crop") == "none":
        cmd += " --no-crop"
    return cmd


def check_for_training(root: Path, *, num_classes: int | None = None, num_channels: int | None = None) -> dict:
    """``root/dataset.json`` if the store is complete and fits the config; otherwise a
    :class:`~jaxseg.data.io.DataError` naming the store (or the ``data.*`` key, both values) and the fix.

    ``num_classes`` must equal the store's label count (largest label value + 1; without a declared
    label set, it must exceed every stored class); ``num_channels`` its channel count."""
    from .io import DataError

    root = Path(root)
    path = root / "dataset.json"
    try:
        meta = read_dataset_meta(root)
    except FileNotFoundError:
        raise DataError(f"{root}: no prepared case store (no dataset.json; run `python -m jaxseg.launch "
                        f"prepare`)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable: {exc}") from None
    if meta.get("status") != "complete":
        raise DataError(f"{path}: status {meta.get('status')!r}: `prepare` did not finish, so the store holds "
                        f"only some cases; finish it with `{_prepare_command(root, meta)}`")
    channels = meta.get("channel_names")
    if num_channels is not None and isinstance(channels, list) and len(channels) != num_channels:
        raise DataError(f"data.num_channels={num_channels} but the store {root} has {len(channels)} channel(s) "
                        f"{channels}; set data.num_channels={len(channels)}")
    labels = meta.get("labels")
    if num_classes is not None:
        if isinstance(labels, dict) and labels:
            n = max(int(v) for v in labels.values()) + 1
            if n != num_classes:
                raise DataError(f"data.num_classes={num_classes} but the store {root} has {n} classes "
                                f"(labels {labels}); set data.num_classes={n}")
        else:
            present = [c for cid in list_cases(root) for c in read_case_meta(root, cid).get("classes_present", [])]
            n = max(present, default=0) + 1
            if n > num_classes:
                raise DataError(f"data.num_classes={num_classes} but the store {root} has label value {n - 1}; "
                                f"set data.num_classes to at least {n}")
    return meta
