"""CSV manifest (jaxseg.data.datasets) from the dHCP structural-pipeline derivatives, with the
neonatal paper's splits (Richter & Fetit).

Layout (dHCP neonatal release 3; ``ROOT`` is the dataset root holding
``derivatives/dhcp_anat_pipeline``, or the ``dhcp_anat_pipeline`` folder itself)::

    derivatives/dhcp_anat_pipeline/
      participants.tsv                       (optional: participant_id, birth_age, ...)
      sub-<id>/sub-<id>_sessions.tsv         session_id, scan_age (weeks PMA), ...
      sub-<id>/ses-<session>/anat/
        sub-<id>_ses-<session>_desc-restore_T2w.nii.gz      bias-corrected T2w
        sub-<id>_ses-<session>_desc-restore_T1w.nii.gz      bias-corrected T1w in T2w space (not always there)
        sub-<id>_ses-<session>_desc-drawem9_dseg.nii.gz     Draw-EM 9-tissue labels

``sessions.tsv`` (and ``participants.tsv``) are also looked for under ``ROOT/rawdata`` and ``ROOT``.
Release 2 names (``desc-restore_space-T2w_T1w``, ``desc-drawem9_space-T2w_dseg``) are accepted too.
``session_id`` may be written with or without the ``ses-`` prefix.

One manifest row per usable session: ``case`` (``sub-<id>_ses-<session>``), ``image_T1w``,
``image_T2w``, ``label``, ``age`` (scan age, weeks PMA, from ``sessions.tsv``), ``split``, and for
reference ``subject``, ``session``, ``birth_age`` (participants.tsv; not used for any split: it is the
gestational age at birth, not the age at scan). A session without T1w, T2w, labels or a scan age is
skipped and listed with the reason. ``labels.json`` (drawem9 names) is written next to the manifest
unless one is already there.

Splits (each deterministic from ``seed``; the counts are parameters so that a small tree works):

``pipeline``  the segmentation pipeline's data. An age-representative subset (``fraction`` = 20%:
              142 of 709 scans) is drawn by quantile bins: the sessions sorted by age are cut into
              ``round(fraction * N)`` equal bins and one session is drawn from each. ``val_fraction``
              of it (20%: 28) is ``val``, drawn the same way, the rest ``train`` (114); ``n_test``
              (100) further sessions, again age-stratified and of subjects not in the subset, are
              ``test``; the rest ``unused``.
``transfer``  the transfer-learning experiment. The ``n_old`` (100) oldest sessions are the source
              domain: ``n_old_val`` (10) random ones are ``pretrain_val``, the rest ``pretrain`` (90);
              the ``n_young`` (120) youngest sessions of subjects not in the source domain are the
              target domain: ``n_finetune`` (40) random ones are ``finetune``, the rest ``test`` (80);
              the rest ``unused``. :func:`phase_rows` relabels one phase to train/val/test for the
              training loop (which trains on ``split == "train"``).

Sessions of one subject (dHCP rescans some preterm infants at term) never straddle train/val/test:
the random or stratified draws for ``val``, ``pretrain_val`` and ``finetune`` take single-session
subjects only, and the test / target pools leave out the subjects already used.

``python -m jaxseg.neonatal.dhcp ROOT --out manifest.csv --split pipeline|transfer [--seed 0] ...``
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from jaxseg.data.io import DataError
from jaxseg.fileio import write_text_atomic

__all__ = [
    "DRAWEM9_LABELS",
    "Session",
    "Scan",
    "scan_dhcp",
    "pipeline_split",
    "transfer_split",
    "phase_rows",
    "build_manifest",
    "write_manifest",
    "main",
]

DRAWEM9_LABELS = {
    "background": 0, "CSF": 1, "cortical_GM": 2, "WM": 3, "inner_background": 4, "ventricles": 5,
    "cerebellum": 6, "deep_GM": 7, "brainstem": 8, "hippocampus": 9,
}
COLUMNS = ("case", "image_T1w", "image_T2w", "label", "age", "split", "subject", "session", "birth_age")
PIPELINE_SPLITS = ("train", "val", "test", "unused")
TRANSFER_SPLITS = ("pretrain", "pretrain_val", "finetune", "test", "unused")

# file kind -> accepted name endings after "sub-<id>_ses-<session>_", first match wins
_FILES = {
    "T2w": ("desc-restore_T2w.nii.gz",),
    "T1w": ("desc-restore_T1w.nii.gz", "desc-restore_space-T2w_T1w.nii.gz"),
    "label": ("desc-drawem9_dseg.nii.gz", "desc-drawem9_space-T2w_dseg.nii.gz"),
}
_SUB = re.compile(r"^sub-([A-Za-z0-9]+)$")
_SES = re.compile(r"^ses-([A-Za-z0-9]+)$")


@dataclass(frozen=True)
class Session:
    subject: str  # without "sub-"
    session: str  # without "ses-"
    t1w: Path
    t2w: Path
    label: Path
    age: float  # scan age, weeks PMA
    birth_age: float | None = None

    @property
    def case_id(self) -> str:
        return f"sub-{self.subject}_ses-{self.session}"


@dataclass
class Scan:
    """What :func:`scan_dhcp` found: usable sessions (sorted by case id) and skipped ones."""

    root: Path  # the dhcp_anat_pipeline folder
    sessions: list[Session]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (case id, reason)


# --------------------------------------------------------------------------- reading the tree


def _anat_root(root: Path) -> Path:
    if not root.exists():
        raise DataError(f"{root}: dHCP folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected the dHCP dataset root or its dhcp_anat_pipeline folder)")
    for cand in (root / "derivatives" / "dhcp_anat_pipeline", root / "dhcp_anat_pipeline", root):
        if cand.is_dir() and any(_SUB.match(p.name) and p.is_dir() for p in cand.iterdir()):
            return cand
    raise DataError(
        f"{root}: no dHCP subjects found (expected {root}/derivatives/dhcp_anat_pipeline/sub-<id>/ses-<session>/"
        f"anat/ or {root}/sub-<id>/ses-<session>/anat/)")


def _meta_dirs(anat: Path, root: Path) -> list[Path]:
    dirs = [anat]
    top = anat.parent.parent if anat.parent.name == "derivatives" else root
    for d in (top, top / "rawdata", root):
        if d not in dirs:
            dirs.append(d)
    return dirs


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames:
            raise DataError(f"{path}: empty TSV (no header)")
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def _number(value: str | None) -> float | None:
    if value is None or value.strip().lower() in ("", "n/a", "na", "nan"):
        return None
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _strip(value: str, prefix: str) -> str:
    return value[len(prefix):] if value.startswith(prefix) else value


def _birth_ages(dirs: Sequence[Path]) -> dict[str, float]:
    for d in dirs:
        p = d / "participants.tsv"
        if p.is_file():
            rows = _read_tsv(p)
            out = {}
            for r in rows:
                age = _number(r.get("birth_age"))
                if r.get("participant_id") and age is not None:
                    out[_strip(r["participant_id"], "sub-")] = age
            return out
    return {}


def _scan_ages(sub: str, dirs: Sequence[Path]) -> tuple[dict[str, str], Path | None]:
    name = f"sub-{sub}_sessions.tsv"
    for d in dirs:
        p = d / f"sub-{sub}" / name
        if p.is_file():
            rows = _read_tsv(p)
            if rows and "session_id" not in rows[0]:
                raise DataError(f"{p}: no 'session_id' column (has {sorted(rows[0])})")
            return {_strip(r["session_id"], "ses-"): r.get("scan_age", "") for r in rows}, p
    return {}, None


def scan_dhcp(root: str | os.PathLike) -> Scan:
    """Find every session of a dHCP anat-pipeline tree; sessions missing a file or a scan age are
    returned in ``skipped`` with the reason. Raises :class:`DataError` when the tree has no subjects
    or no usable session."""
    root = Path(root).expanduser().resolve()
    anat = _anat_root(root)
    dirs = _meta_dirs(anat, root)
    birth = _birth_ages(dirs)
    sessions: list[Session] = []
    skipped: list[tuple[str, str]] = []
    for sub_dir in sorted(p for p in anat.iterdir() if p.is_dir() and _SUB.match(p.name)):
        sub = _SUB.match(sub_dir.name).group(1)
        ses_dirs = sorted(p for p in sub_dir.iterdir() if p.is_dir() and _SES.match(p.name))
        if not ses_dirs:
            skipped.append((f"sub-{sub}", f"{sub_dir}: no ses-* folder"))
            continue
        ages, tsv = _scan_ages(sub, dirs)
        for ses_dir in ses_dirs:
            ses = _SES.match(ses_dir.name).group(1)
            case = f"sub-{sub}_ses-{ses}"
            adir = ses_dir / "anat"
            found: dict[str, Path] = {}
            missing = []
            for kind, endings in _FILES.items():
                hit = next((adir / f"{case}_{e}" for e in endings if (adir / f"{case}_{e}").is_file()), None)
                if hit is None:
                    missing.append(f"{kind} ({case}_{endings[0]})")
                else:
                    found[kind] = hit
            if missing:
                where = adir if adir.is_dir() else f"{ses_dir} (no anat folder)"
                skipped.append((case, f"missing {', '.join(missing)} in {where}"))
                continue
            if tsv is None:
                looked = ", ".join(str(d / f"sub-{sub}") for d in dirs)
                skipped.append((case, f"no sub-{sub}_sessions.tsv (looked in {looked})"))
                continue
            if ses not in ages:
                skipped.append((case, f"{tsv}: no row for session_id {ses}"))
                continue
            age = _number(ages[ses])
            if age is None:
                skipped.append((case, f"{tsv}: scan_age of session {ses} is {ages[ses]!r}, not a number"))
                continue
            sessions.append(Session(sub, ses, found["T1w"], found["T2w"], found["label"], age, birth.get(sub)))
    if not sessions:
        detail = "; ".join(f"{c}: {r}" for c, r in skipped[:5])
        raise DataError(f"{anat}: no usable dHCP session ({len(skipped)} skipped{': ' + detail if detail else ''})")
    return Scan(anat, sessions, skipped)


# --------------------------------------------------------------------------- splits


def _by_age(sessions: Iterable[Session]) -> list[Session]:
    return sorted(sessions, key=lambda s: (s.age, s.case_id))


def _rng(seed: int, step: int) -> np.random.Generator:
    # one stream per draw, so that changing one count does not reshuffle the others
    return np.random.default_rng([int(seed), step])


def _stratified(sessions: Sequence[Session], n: int, rng: np.random.Generator) -> list[Session]:
    """n sessions, one from each of n equal consecutive bins of the age-sorted list."""
    ordered = _by_age(sessions)
    size = len(ordered)
    edges = [i * size // n for i in range(n + 1)] if n else [0]
    return [ordered[int(rng.integers(edges[i], edges[i + 1]))] for i in range(n)]


def _random(sessions: Sequence[Session], n: int, rng: np.random.Generator) -> list[Session]:
    ordered = sorted(sessions, key=lambda s: s.case_id)
    return [ordered[i] for i in sorted(rng.choice(len(ordered), size=n, replace=False))] if n else []


def _singles(sessions: Sequence[Session]) -> list[Session]:
    """The sessions whose subject has no other session among `sessions`."""
    count = Counter(s.subject for s in sessions)
    return [s for s in sessions if count[s.subject] == 1]


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # half up (Python's round() would take 2.5 to 2)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def pipeline_split(sessions: Sequence[Session], *, fraction: float = 0.2, val_fraction: float = 0.2,
                   n_test: int = 100, seed: int = 0) -> dict[str, str]:
    """case id -> train / val / test / unused (see the module docstring). Counts round half up."""
    _need(0.0 < fraction <= 1.0, f"fraction must be in (0, 1], got {fraction!r}")
    _need(0.0 <= val_fraction < 1.0, f"val_fraction must be in [0, 1), got {val_fraction!r}")
    _need(n_test >= 0, f"n_test must be >= 0, got {n_test}")
    n = len(sessions)
    n_subset = _round(fraction * n)
    n_val = _round(val_fraction * n_subset)
    _need(n_subset >= 1 and n_val < n_subset,
          f"pipeline split: {n} sessions give a {fraction:g} subset of {n_subset} with {n_val} for validation; "
          f"at least one training session is needed")
    subset = _stratified(sessions, n_subset, _rng(seed, 0))
    singles = _singles(subset)
    _need(len(singles) >= n_val, f"pipeline split: {n_val} validation sessions needed but only {len(singles)} "
                                 f"of the subset's subjects have a single session in it")
    val = {s.case_id for s in _stratified(singles, n_val, _rng(seed, 1))}
    used_subjects = {s.subject for s in subset}
    chosen = {s.case_id for s in subset}
    pool = [s for s in sessions if s.case_id not in chosen and s.subject not in used_subjects]
    _need(len(pool) >= n_test,
          f"pipeline split: n_test={n_test} but only {len(pool)} sessions of subjects outside the {n_subset}-session "
          f"training subset remain (of {n}); pass a smaller n_test")
    test = {s.case_id for s in _stratified(pool, n_test, _rng(seed, 2))}
    out = {}
    for s in sessions:
        c = s.case_id
        out[c] = "val" if c in val else "train" if c in chosen else "test" if c in test else "unused"
    return out


def transfer_split(sessions: Sequence[Session], *, n_old: int = 100, n_old_val: int = 10, n_young: int = 120,
                   n_finetune: int = 40, seed: int = 0) -> dict[str, str]:
    """case id -> pretrain / pretrain_val / finetune / test / unused (see the module docstring)."""
    _need(n_old >= 1 and 0 <= n_old_val < n_old,
          f"transfer split: need n_old >= 1 and 0 <= n_old_val < n_old, got n_old={n_old}, n_old_val={n_old_val}")
    _need(n_young >= 1 and 0 <= n_finetune <= n_young,
          f"transfer split: need n_young >= 1 and 0 <= n_finetune <= n_young, got n_young={n_young}, "
          f"n_finetune={n_finetune}")
    ordered = _by_age(sessions)
    _need(len(ordered) >= n_old + n_young,
          f"transfer split: needs n_old + n_young = {n_old + n_young} sessions but the tree has {len(ordered)} "
          f"usable; pass smaller counts")
    old = ordered[-n_old:]
    old_subjects = {s.subject for s in old}
    young_pool = [s for s in ordered[:-n_old] if s.subject not in old_subjects]
    _need(len(young_pool) >= n_young,
          f"transfer split: n_young={n_young} but only {len(young_pool)} sessions of subjects outside the "
          f"{n_old} oldest remain; pass a smaller n_young")
    young = young_pool[:n_young]
    old_singles, young_singles = _singles(old), _singles(young)
    _need(len(old_singles) >= n_old_val, f"transfer split: {n_old_val} pre-training validation sessions needed "
                                         f"but only {len(old_singles)} source subjects have a single session")
    _need(len(young_singles) >= n_finetune, f"transfer split: {n_finetune} fine-tuning sessions needed but only "
                                            f"{len(young_singles)} target subjects have a single session")
    val = {s.case_id for s in _random(old_singles, n_old_val, _rng(seed, 10))}
    finetune = {s.case_id for s in _random(young_singles, n_finetune, _rng(seed, 11))}
    old_ids, young_ids = {s.case_id for s in old}, {s.case_id for s in young}
    out = {}
    for s in sessions:
        c = s.case_id
        out[c] = ("pretrain_val" if c in val else "pretrain" if c in old_ids else "finetune" if c in finetune
                  else "test" if c in young_ids else "unused")
    return out


_PHASES = {
    "pretrain": {"pretrain": "train", "pretrain_val": "val"},
    "finetune": {"finetune": "train", "test": "test"},
}


def phase_rows(rows: Sequence[dict], phase: str) -> list[dict]:
    """The rows of one transfer-learning phase, with the project's split names: ``pretrain``
    (pretrain -> train, pretrain_val -> val) or ``finetune`` (finetune -> train, test -> test; also
    the from-scratch baseline and the ``none`` strategy's evaluation)."""
    if phase not in _PHASES:
        raise ValueError(f"unknown phase {phase!r}; valid: {', '.join(_PHASES)}")
    rename = _PHASES[phase]
    return [{**r, "split": rename[r["split"]]} for r in rows if r.get("split") in rename]


# --------------------------------------------------------------------------- manifest


@dataclass
class BuildResult:
    path: Path
    rows: list[dict]
    skipped: list[tuple[str, str]]
    counts: dict[str, int]


def _rows(scan: Scan, splits: dict[str, str], base: Path | None) -> list[dict]:
    def path(p: Path) -> str:
        return os.path.relpath(p, base) if base is not None else str(p)

    rows = []
    for s in scan.sessions:
        rows.append({
            "case": s.case_id, "image_T1w": path(s.t1w), "image_T2w": path(s.t2w), "label": path(s.label),
            "age": repr(float(s.age)), "split": splits[s.case_id], "subject": s.subject, "session": s.session,
            "birth_age": "" if s.birth_age is None else repr(float(s.birth_age)),
        })
    return rows


def write_manifest(rows: Sequence[dict], out: str | os.PathLike, *, labels_json: bool = True) -> Path:
    """Write the rows as the project's CSV manifest (and ``labels.json`` next to it, if absent)."""
    out = Path(out)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in COLUMNS})
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, buf.getvalue())
    if labels_json:
        side = out.parent / "labels.json"
        if not side.exists():
            write_text_atomic(side, json.dumps(DRAWEM9_LABELS, indent=2) + "\n")
        else:
            try:
                same = json.loads(side.read_text()) in (DRAWEM9_LABELS, {"labels": DRAWEM9_LABELS})
            except ValueError:
                same = False
            if not same:
                warnings.warn(f"{side} exists and is not the drawem9 label set; left as it is")
    return out


def build_manifest(root: str | os.PathLike, out: str | os.PathLike, *, split: str = "pipeline", seed: int = 0,
                   relative: bool = False, phase: str | None = None, **counts) -> BuildResult:
    """Scan a dHCP tree, split it and write the manifest. ``counts`` go to :func:`pipeline_split`
    (fraction, val_fraction, n_test) or :func:`transfer_split` (n_old, n_old_val, n_young,
    n_finetune). ``relative``: paths relative to the manifest's folder (default absolute).
    ``phase`` (transfer only): write just that phase's rows, relabelled by :func:`phase_rows`."""
    scan = scan_dhcp(root)
    if split == "pipeline":
        if phase is not None:
            raise ValueError("phase applies to the transfer split only")
        splits = pipeline_split(scan.sessions, seed=seed, **counts)
    elif split == "transfer":
        splits = transfer_split(scan.sessions, seed=seed, **counts)
    else:
        raise ValueError(f"unknown split {split!r}; valid: pipeline, transfer")
    out = Path(out).expanduser().absolute()
    rows = _rows(scan, splits, out.parent if relative else None)
    if phase is not None:
        rows = phase_rows(rows, phase)
    write_manifest(rows, out)
    return BuildResult(out, rows, scan.skipped, dict(Counter(r["split"] for r in rows)))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxseg.neonatal.dhcp", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="dHCP dataset root (holding derivatives/dhcp_anat_pipeline) or that folder")
    p.add_argument("--out", required=True, help="manifest CSV to write (labels.json goes next to it)")
    p.add_argument("--split", choices=("pipeline", "transfer"), default="pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--relative", action="store_true", help="paths relative to the manifest's folder")
    g = p.add_argument_group("pipeline split")
    g.add_argument("--fraction", type=float, default=0.2, help="age-representative training subset (0.2)")
    g.add_argument("--val-fraction", type=float, default=0.2, help="share of the subset for validation (0.2)")
    g.add_argument("--n-test", type=int, default=100)
    g = p.add_argument_group("transfer split")
    g.add_argument("--n-old", type=int, default=100)
    g.add_argument("--n-old-val", type=int, default=10)
    g.add_argument("--n-young", type=int, default=120)
    g.add_argument("--n-finetune", type=int, default=40)
    g.add_argument("--phase", choices=tuple(_PHASES), help="write only this phase, with train/val/test splits")
    a = p.parse_args(argv)
    if a.split == "pipeline":
        counts = dict(fraction=a.fraction, val_fraction=a.val_fraction, n_test=a.n_test)
    else:
        counts = dict(n_old=a.n_old, n_old_val=a.n_old_val, n_young=a.n_young, n_finetune=a.n_finetune)
    try:
        res = build_manifest(a.root, a.out, split=a.split, seed=a.seed, relative=a.relative, phase=a.phase, **counts)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    order = PIPELINE_SPLITS if a.split == "pipeline" else TRANSFER_SPLITS + ("train", "val")
    summary = ", ".join(f"{k} {res.counts[k]}" for k in order if k in res.counts)
    print(f"{res.path}: {len(res.rows)} sessions ({summary})")
    if res.skipped:
        print(f"skipped {len(res.skipped)} session(s):")
        for case, reason in res.skipped:
            print(f"  {case}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
