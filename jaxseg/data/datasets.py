"""Dataset readers: nnU-Net raw folders (v2 and v1 ``dataset.json``) and CSV manifests.

All readers return a :class:`Dataset`: the cases as :class:`CaseRecord` (absolute paths), the
channel names (in channel order) and the declared label set (name -> int). Nothing is loaded
here; :mod:`jaxseg.data.prepare` loads and checks the images.

``read_dataset(path)`` dispatches: a folder -> :func:`read_nnunet_raw`, a ``.csv`` file ->
:func:`read_manifest`.

nnU-Net raw folder (v2)
-----------------------
``DatasetXXX_Name/dataset.json`` with ``channel_names`` ({"0": "T1", "1": "T2"}), ``labels``
(name -> int, "background": 0), ``numTraining``, ``file_ending`` (".nii.gz");
``imagesTr/CASE_0000.nii.gz`` (4-digit channel suffix), ``labelsTr/CASE.nii.gz``, optional
``imagesTs/`` (split "test", with labels when ``labelsTs/CASE.nii.gz`` exists). A v2 ``"dataset"``
entry listing files explicitly ({"CASE": {"images": [...], "label": ...}}) is honoured. The v1 form
(``modality`` {"0": "T1"}, ``labels`` {"0": "background"}, ``training`` [{"image":
"./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}], ``test`` ["./imagesTs/y.nii.gz"]) is
read too; the channel files are ``x_0000.nii.gz``, ... (a single-channel dataset may also use the
listed ``x.nii.gz`` itself). A ``metadata.csv`` next to ``dataset.json`` with a ``case`` column
and any of ``stratum``, ``age``, ``site``, ``split`` is merged into the records.

CSV manifest
------------
One row per case; paths are absolute or relative to the CSV's folder. Columns:

* ``image_<name>``: one column per channel, in channel order; ``<name>`` becomes the channel
  name (``image_T1,image_T2``). A single-channel manifest may use a plain ``image`` column. To
  use other column names pass ``channels=["t1_path", "t2_path"]`` (the names then are the
  column names, minus any ``image_`` prefix).
* ``label``: the label map (empty cell = unlabelled case).
* optional ``case`` (default: the label's, else the first image's file name without extension
  and ``_0000`` suffix), ``stratum``, ``age`` (a number), ``site``, ``split``.

The label set comes from ``labels=`` ({"background": 0, ...}), else from a ``labels.json`` (same
mapping, or an nnU-Net ``dataset.json``-style object with a ``labels`` key) next to the CSV; if
neither exists the label set is ``None`` and label values are not checked against it.

Examples (short):

* FeTA (fetal, T2w, 7 tissues)::

      case,image_T2w,label,stratum,age,site
      sub-001,sub-001/anat/sub-001_rec-mial_T2w.nii.gz,sub-001/anat/sub-001_rec-mial_dseg.nii.gz,Pathological,27.9,mial

  with ``labels.json`` {"background": 0, "eCSF": 1, "GM": 2, "WM": 3, "ventricles": 4,
  "cerebellum": 5, "deep_GM": 6, "brainstem": 7}; ``stratum`` = the participants.tsv
  "Pathology" column, ``age`` = gestational age (weeks), ``site`` = the reconstruction method.
* dHCP (neonatal, T1w + T2w, drawem9)::

      case,image_T1w,image_T2w,label,age,split
      sub-CC00050XX01_ses-7201,<...>_desc-restore_space-T2w_T1w.nii.gz,<...>_desc-restore_T2w.nii.gz,<...>_desc-drawem9_dseg.nii.gz,40.6,train

  with ``labels.json`` in drawem9 order (0 BG, 1 CSF, 2 cGM, 3 WM, 4 bg, 5 Vent, 6 Cereb, 7 dGM,
  8 BS, 9 Hippo); ``age`` = PMA at scan (weeks).
* MSSEG-2016 / ISBI-2015 (MS lesions, FLAIR + T1)::

      case,image_FLAIR,image_T1,label,site
      01016SACH,01016SACH/FLAIR_preprocessed.nii.gz,01016SACH/T1_preprocessed.nii.gz,01016SACH/Consensus.nii.gz,center01
      training01_01,training01/training01_01_flair_pp.nii,training01/training01_01_mprage_pp.nii,training01/training01_01_mask1.nii,isbi

  with ``labels.json`` {"background": 0, "lesion": 1}.

Missing files: with ``strict=True`` (default) a missing image/label file raises
:class:`~jaxseg.data.io.DataError` naming the file (for manifests: the CSV, the row number and
the missing path). With ``strict=False`` the record is returned with ``problem`` set to that
message, so that ``prepare(..., skip_bad=True)`` can reject it and go on.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .io import DataError

__all__ = [
    "CaseRecord",
    "Dataset",
    "read_dataset",
    "read_nnunet_raw",
    "read_manifest",
    "METADATA_COLUMNS",
]

METADATA_COLUMNS = ("stratum", "age", "site", "split")


@dataclass
class CaseRecord:
    """One case: absolute paths to its channel images (one file per channel, channel order) and
    label (``None`` when unlabelled), plus optional metadata. ``problem`` is set (instead of
    raising) by non-strict readers when the case cannot be used, e.g. a file is missing."""

    case_id: str
    images: list[Path]
    label: Path | None = None
    stratum: str | None = None
    age: float | None = None
    site: str | None = None
    split: str | None = None
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["images"] = [str(p) for p in self.images]
        d["label"] = None if self.label is None else str(self.label)
        return d


@dataclass
class Dataset:
    """What a reader returns: cases plus the dataset-level description."""

    root: Path
    format: str  # "nnunet_v2" | "nnunet_v1" | "manifest"
    channel_names: list[str]
    labels: dict[str, int] | None
    cases: list[CaseRecord] = field(default_factory=list)
    name: str = ""
    file_ending: str = ".nii.gz"

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> set[int] | None:
        return None if self.labels is None else set(self.labels.values())

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self):
        return iter(self.cases)


# --------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    return obj


def _check_labels(labels: dict[str, int], source: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise DataError(
                f"{source}: label {name!r} has value {value!r}; an integer is required "
                f"(region-based label lists are not supported)"
            )
        v = int(value)
        if not 0 <= v <= 255:
            raise DataError(f"{source}: label {name!r} = {v} is outside 0..255 (labels are stored as uint8)")
        if v in out.values():
            other = next(k for k, x in out.items() if x == v)
            raise DataError(f"{source}: labels {other!r} and {name!r} share the value {v}")
        out[str(name)] = v
    if 0 not in out.values():
        raise DataError(f"{source}: the label set {out} has no background (value 0)")
    return out


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def _parse_age(value: str | None, where: str) -> float | None:
    value = _clean(value)
    if value is None:
        return None
    try:
        age = float(value)
    except ValueError:
        raise DataError(f"{where}: age {value!r} is not a number") from None
    if not math.isfinite(age):
        raise DataError(f"{where}: age {value!r} is not finite")
    return age


def _missing_key(js: Path, meta: dict, key: str, what: str) -> DataError:
    """A DataError naming the file, the missing key, a near-miss key that is there, and the keys present."""
    near = difflib.get_close_matches(key, [str(k) for k in meta], n=1, cutoff=0.6)
    hint = f" (found {near[0]!r}: rename it to {key!r})" if near else ""
    return DataError(f"{js}: missing key {key!r} ({what}){hint}; keys present: {sorted(map(str, meta))}")


def _finish(records: list[CaseRecord], strict: bool) -> list[CaseRecord]:
    if strict:
        for r in records:
            if r.problem:
                raise DataError(r.problem)
    return records


def _strip_nifti(name: str) -> str:
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd", ".gz"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name.rsplit(".", 1)[0] if "." in name else name


# --------------------------------------------------------------------------- nnU-Net raw


def _merge_metadata(records: list[CaseRecord], csv_path: Path) -> None:
    by_id = {r.case_id: r for r in records}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "case" not in cols:
            raise DataError(f"{csv_path}: metadata table needs a 'case' column (has {cols})")
        for row in reader:
            row = {(k or "").strip(): v for k, v in row.items()}
            where = f"{csv_path}: line {reader.line_num}"
            rec = by_id.get(_clean(row.get("case")) or "")
            if rec is None:
                continue  # metadata for cases not in this dataset (e.g. held-out) is fine
            for col in ("stratum", "site", "split"):
                v = _clean(row.get(col))
                if v is not None:
                    setattr(rec, col, v)
            age = _parse_age(row.get("age"), where)
            if age is not None:
                rec.age = age


def _v2_cases(folder: Path, sub_images: str, sub_labels: str, ending: str, n_ch: int,
              channel_names: list[str], split: str, label_required: bool) -> list[CaseRecord]:
    img_dir, lab_dir = folder / sub_images, folder / sub_labels
    pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + r"$")
    ids: set[str] = set()
    if img_dir.is_dir():
        for p in img_dir.iterdir():
            m = None if p.name.startswith(".") else pattern.match(p.name)
            if m:
                ids.add(m.group("case"))
    if label_required and lab_dir.is_dir():
        for p in lab_dir.iterdir():
            if p.name.endswith(ending) and not p.name.startswith("."):
                ids.add(p.name[: -len(ending)])
    records = []
    for cid in sorted(ids):
        images = [img_dir / f"{cid}_{c:04d}{ending}" for c in range(n_ch)]
        label = lab_dir / f"{cid}{ending}"
        problem = None
        for c, p in enumerate(images):
            if not p.is_file():
                problem = f"{p}: missing channel file (case {cid!r}, channel {c} {channel_names[c]!r})"
                break
        if not label.is_file():
            if label_required and problem is None:
                problem = f"{label}: missing label file (case {cid!r})"
            if not label_required:
                label = None
        records.append(CaseRecord(cid, images, label, split=split, problem=problem))
    return records


def _read_v2(folder: Path, meta: dict, js: Path) -> Dataset:
    ch = meta.get("channel_names")
    if ch is None:
        raise _missing_key(js, meta, "channel_names", 'channel index -> name, e.g. {"0": "T1"}')
    if not isinstance(ch, dict) or not ch:
        raise DataError(f"{js}: 'channel_names' must be a non-empty object like {{\"0\": \"T1\"}}")
    try:
        order = sorted(ch, key=int)
    except ValueError:
        raise DataError(f"{js}: channel_names keys must be channel indices \"0\", \"1\", ...") from None
    if [int(k) for k in order] != list(range(len(order))):
        raise DataError(f"{js}: channel_names keys must be 0..{len(order) - 1}, got {order}")
    channel_names = [str(ch[k]) for k in order]
    if "labels" not in meta:
        raise _missing_key(js, meta, "labels", 'label name -> int, e.g. {"background": 0}')
    if not isinstance(meta["labels"], dict):
        raise DataError(f"{js}: 'labels' must be an object (label name -> int), got {meta['labels']!r}")
    labels = _check_labels(meta["labels"], js)
    ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DataError(f"{js}: 'file_ending' must be a string like \".nii.gz\", got {ending!r}")
    n_ch = len(channel_names)

    if isinstance(meta.get("dataset"), dict):  # explicit file lists (nnU-Net v2 option)
        records = []
        for cid, entry in sorted(meta["dataset"].items()):
            if not isinstance(entry, dict) or not isinstance(entry.get("images", []), list):
                raise DataError(f"{js}: 'dataset' entry {cid!r} must be an object "
                                f"{{\"images\": [...], \"label\": ...}}, got {entry!r}")
            images = [(folder / p).resolve() for p in entry.get("images", [])]
            label = (folder / entry["label"]).resolve() if entry.get("label") else None
            problem = None
            if len(images) != n_ch:
                problem = f"{js}: case {cid!r} lists {len(images)} images, channel_names has {n_ch}"
            else:
                for c, p in enumerate(images):
                    if not p.is_file():
                        problem = f"{p}: missing channel file (case {cid!r}, channel {c} {channel_names[c]!r})"
                        break
            if problem is None and label is not None and not label.is_file():
                problem = f"{label}: missing label file (case {cid!r})"
            records.append(CaseRecord(cid, images, label, split="train", problem=problem))
    else:
        if not (folder / "imagesTr").is_dir():
            raise DataError(f"{folder}: no imagesTr folder")
        records = _v2_cases(folder, "imagesTr", "labelsTr", ending, n_ch, channel_names, "train", True)
        n_train = meta.get("numTraining")
        if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, int)):
            raise DataError(f"{js}: 'numTraining' must be an integer, got {n_train!r}")
        if n_train is not None and int(n_train) != len(records):
            warnings.warn(f"{js}: numTraining is {n_train} but {len(records)} training cases were found")
        if (folder / "imagesTs").is_dir():
            test = _v2_cases(folder, "imagesTs", "labelsTs", ending, n_ch, channel_names, "test", False)
            records += test
    return Dataset(folder, "nnunet_v2", channel_names, labels, records,
                   name=str(meta.get("name", folder.name)), file_ending=ending)


def _v1_channel_files(folder: Path, rel: str, n_ch: int) -> list[Path]:
    listed = (folder / rel).resolve()
    name = listed.name
    ending = ".nii.gz" if name.endswith(".nii.gz") else "".join(listed.suffixes[-1:])
    stem = name[: -len(ending)] if ending else name
    files = [listed.parent / f"{stem}_{c:04d}{ending}" for c in range(n_ch)]
    if n_ch == 1 and not files[0].exists() and listed.exists():
        return [listed]
    return files


def _read_v1(folder: Path, meta: dict, js: Path) -> Dataset:
    mod = meta.get("modality")
    if not isinstance(mod, dict) or not mod:
        raise DataError(f"{js}: 'modality' must be a non-empty object like {{\"0\": \"T1\"}}")
    try:
        order = sorted(mod, key=int)
    except ValueError:
        raise DataError(f"{js}: modality keys must be channel indices \"0\", \"1\", ...") from None
    channel_names = [str(mod[k]) for k in order]
    raw_labels = meta.get("labels")
    if raw_labels is None:
        raise _missing_key(js, meta, "labels", 'v1: value -> name, e.g. {"0": "background"}')
    if not isinstance(raw_labels, dict):
        raise DataError(f"{js}: 'labels' must be an object (v1: value -> name), got {raw_labels!r}")
    try:
        labels = _check_labels({str(v): int(k) for k, v in raw_labels.items()}, js)
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{js}: v1 'labels' keys must be integers (\"0\": \"background\")") from None
    n_ch = len(channel_names)
    records: list[CaseRecord] = []
    for key in ("training", "test"):
        entries = meta.get(key, [])
        if not isinstance(entries, list) or not all(
                isinstance(e, str) or (isinstance(e, dict) and isinstance(e.get("image"), str)) for e in entries):
            raise DataError(f"{js}: {key!r} must be a list of file names or {{\"image\": ..., \"label\": ...}} "
                            f"objects (every one with an 'image')")
    for entry in meta.get("training", []):
        rel = entry["image"] if isinstance(entry, dict) else entry
        images = _v1_channel_files(folder, rel, n_ch)
        cid = _strip_nifti(Path(rel).name)
        lab_rel = entry.get("label") if isinstance(entry, dict) else None
        label = (folder / lab_rel).resolve() if lab_rel else None
        problem = next(
            (f"{p}: missing channel file (case {cid!r}, channel {c} {channel_names[c]!r})"
             for c, p in enumerate(images) if not p.is_file()), None)
        if problem is None and label is not None and not label.is_file():
            problem = f"{label}: missing label file (case {cid!r})"
        records.append(CaseRecord(cid, images, label, split="train", problem=problem))
    for entry in meta.get("test", []):
        rel = entry["image"] if isinstance(entry, dict) else entry
        images = _v1_channel_files(folder, rel, n_ch)
        cid = _strip_nifti(Path(rel).name)
        problem = next(
            (f"{p}: missing channel file (case {cid!r}, channel {c} {channel_names[c]!r})"
             for c, p in enumerate(images) if not p.is_file()), None)
        records.append(CaseRecord(cid, images, None, split="test", problem=problem))
    return Dataset(folder, "nnunet_v1", channel_names, labels, records,
                   name=str(meta.get("name", folder.name)), file_ending=".nii.gz")


def read_nnunet_raw(folder: str | Path, *, strict: bool = True) -> Dataset:
    """Read an nnU-Net raw dataset folder (v2 or v1 ``dataset.json``; see the module docstring).

    Training cases get ``split="train"``, ``imagesTs`` cases ``split="test"`` unless a
    ``metadata.csv`` next to ``dataset.json`` says otherwise.
    """
    folder = Path(folder).resolve()
    js = folder / "dataset.json"
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    meta = _read_json(js)
    if "channel_names" in meta:
        ds = _read_v2(folder, meta, js)
    elif "modality" in meta or "training" in meta:
        ds = _read_v1(folder, meta, js)
    else:
        err = _missing_key(js, meta, "channel_names", 'nnU-Net v2; v1 has "modality" instead')
        raise DataError(f"{err} (neither nnU-Net v2 nor v1 format)")
    ids = [r.case_id for r in ds.cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(f"{js}: duplicate case ids {dup}")
    md = folder / "metadata.csv"
    if md.is_file():
        _merge_metadata(ds.cases, md)
    _finish(ds.cases, strict)
    return ds


# --------------------------------------------------------------------------- CSV manifest


def _manifest_labels(csv_path: Path, labels: dict[str, int] | None) -> dict[str, int] | None:
    if labels is not None:
        return _check_labels(dict(labels), "labels argument")
    side = csv_path.parent / "labels.json"
    if not side.is_file():
        return None
    obj = _read_json(side)
    if isinstance(obj.get("labels"), dict):
        obj = obj["labels"]
    return _check_labels(obj, side)


def read_manifest(
    csv_path: str | Path,
    *,
    channels: Sequence[str] | None = None,
    labels: dict[str, int] | None = None,
    strict: bool = True,
) -> Dataset:
    """Read a CSV manifest (format in the module docstring).

    ``channels``: names of the image columns in channel order (default: every ``image_<name>``
    column in file order, or a single ``image`` column). ``labels``: the label set (default:
    ``labels.json`` next to the CSV, else ``None``).

    A row whose image or label file does not exist raises :class:`DataError`
    ``"<csv>: row <n> (line <l>), column '<col>': file not found: <path>"`` (with
    ``strict=False`` the message goes into the record's ``problem`` instead).

    Long on purpose: one check after another on the header, then on each row, each with its own
    message naming the file, row and column.
    """
    csv_path = Path(csv_path).resolve()
    base = csv_path.parent
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: file not found")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if not fields:
            raise DataError(f"{csv_path}: empty manifest (no header row)")
        if channels is not None:
            image_cols = list(channels)
            missing = [c for c in image_cols if c not in fields]
            if missing:
                raise DataError(f"{csv_path}: channel column(s) {missing} not in the header {fields}")
        else:
            image_cols = [c for c in fields if c.startswith("image_")]
            if not image_cols and "image" in fields:
                image_cols = ["image"]
        if not image_cols:
            raise DataError(
                f"{csv_path}: no image columns (expected 'image_<channel>' columns, a single "
                f"'image' column, or channels=[...]); header is {fields}"
            )
        channel_names = [c[len("image_"):] if c.startswith("image_") else c for c in image_cols]
        has_label = "label" in fields
        has_case = "case" in fields
        records: list[CaseRecord] = []
        rows: list[int] = []  # the data row number of each record
        for n, row in enumerate(reader, start=1):
            row = {(k or "").strip(): v for k, v in row.items()}
            if all(_clean(v) is None for v in row.values() if isinstance(v, str)):
                continue  # blank line
            where = f"{csv_path}: row {n} (line {reader.line_num})"
            problem = None
            images: list[Path] = []
            for col in image_cols:
                v = _clean(row.get(col))
                if v is None:
                    problem = problem or f"{where}, column {col!r}: empty image path"
                    images.append(base / "")
                    continue
                p = Path(v).expanduser()
                p = (p if p.is_absolute() else base / p).resolve()
                images.append(p)
                if problem is None and not p.is_file():
                    problem = f"{where}, column {col!r}: file not found: {p}"
            label = None
            lv = _clean(row.get("label")) if has_label else None
            if lv is not None:
                lp = Path(lv).expanduser()
                label = (lp if lp.is_absolute() else base / lp).resolve()
                if problem is None and not label.is_file():
                    problem = f"{where}, column 'label': file not found: {label}"
            cid = _clean(row.get("case"))
            if cid is None:
                src = label if label is not None else (images[0] if images else None)
                cid = re.sub(r"_\d{4}$", "", _strip_nifti(src.name)) if src is not None else f"row{n}"
            rows.append(n)
            records.append(CaseRecord(
                cid, images, label,
                stratum=_clean(row.get("stratum")),
                age=_parse_age(row.get("age"), where),
                site=_clean(row.get("site")),
                split=_clean(row.get("split")),
                problem=problem,
            ))
    ids = [r.case_id for r in records]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        where = "; ".join(f"{i!r} in rows {', '.join(str(n) for n, c in zip(rows, ids) if c == i)}" for i in dup)
        fix = ("make the 'case' column unique" if has_case else
               "the ids come from the file names; add a unique 'case' column")
        raise DataError(f"{csv_path}: duplicate case id(s): {where} (rows counted from 1 after the header); {fix}")
    bad_ids = [i for i in ids if "/" in i or "\\" in i or i.startswith(".")]
    if bad_ids:
        raise DataError(f"{csv_path}: case ids must not contain '/' or start with '.': {bad_ids}")
    ds = Dataset(csv_path, "manifest", channel_names, _manifest_labels(csv_path, labels), records,
                 name=csv_path.stem)
    _finish(records, strict)
    return ds


def read_dataset(path: str | Path, *, strict: bool = True, **kwargs) -> Dataset:
    """Read a dataset: a folder is an nnU-Net raw dataset, a ``.csv`` file a manifest
    (``kwargs`` go to :func:`read_manifest`: ``channels=``, ``labels=``)."""
    path = Path(path)
    if path.is_dir():
        if kwargs:
            raise TypeError(f"read_nnunet_raw takes no {sorted(kwargs)}")
        return read_nnunet_raw(path, strict=strict)
    if path.suffix.lower() == ".csv":
        return read_manifest(path, strict=strict, **kwargs)
    if not path.exists():
        raise DataError(f"{path}: not found (expected an nnU-Net raw folder or a .csv manifest)")
    raise DataError(f"{path}: not a folder or a .csv manifest")
