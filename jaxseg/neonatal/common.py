"""What the neonatal studies share: the synthetic tissue cohort (written and prepared once per study
workdir), per-case Dice against the reference labels, image folders for `predict`, and the figure of
the cohort's age effect (Richter & Fetit's age experiments need one the network can see)."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from jaxseg.evaluation.plots import save_figure
from jaxseg.fileio import write_text_atomic
from jaxseg.neonatal.config import NeonatalConfig

# Background classes, left out of "Dice (foreground)": on the synthetic tissue labels class 0 only
# (dHCP's drawem9 would be (0, 4), outer and inner background).
BACKGROUND = (0,)


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------------- cohort


def tissue_cohort(cfg: NeonatalConfig, workdir: Path, *, progress: bool = True, timings: dict | None = None) -> NeonatalConfig:
    """Write `cfg.synth`'s tissue cohort into ``workdir/data/raw`` and prepare it into
    ``workdir/data/store`` (each skipped when already complete); returns `cfg` pointing at both."""
    import time

    from jaxseg.data.prepare import prepare
    from jaxseg.data.synth import write_cohort

    timings = {} if timings is None else timings
    raw, store_dir = workdir / "data" / "raw", workdir / "data" / "store"
    t = time.perf_counter()
    if not (raw / "dataset.json").exists():
        write_cohort(raw, dataclasses.replace(cfg.synth, flavour="tissue"), progress=progress, overwrite=True)
    timings["synth_s"] = time.perf_counter() - t
    t = time.perf_counter()
    prepare(raw, store_dir, progress=progress)
    timings["prepare_s"] = time.perf_counter() - t
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=str(raw), store=str(store_dir)))


def image_folder(folder: Path, records) -> Path:
    """A plain folder of ``CASE_XXXX.nii.gz`` links to `records`' images (what predict reads; it can
    hold any subset of a dataset, which an nnU-Net raw folder cannot select alone)."""
    folder.mkdir(parents=True, exist_ok=True)
    for rec in records:
        for ch, src in enumerate(rec.images):
            dst = folder / f"{rec.case_id}_{ch:04d}.nii.gz"
            if not dst.exists():
                try:
                    os.symlink(Path(src).resolve(), dst)
                except OSError:
                    shutil.copyfile(src, dst)
    return folder


# ---------------------------------------------------------------------------------------- evaluation


def case_dice(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int],
              background: Sequence[int] = BACKGROUND) -> dict:
    """Per-class Dice of one case and its means over all classes and over the foreground classes
    (classes absent from both maps are left out of the means)."""
    from jaxseg.evaluation.metrics import dice_per_class

    per = dice_per_class(pred, ref, labels)
    fg = [v for k, v in per.items() if k not in set(background)]
    with np.errstate(all="ignore"):
        return {"all": float(np.nanmean(list(per.values()))) if per else math.nan,
                "fg": float(np.nanmean(fg)) if fg else math.nan, "per_class": per}


def score_cases(pred_dir: Path, references: Mapping[str, Path], labels: Sequence[int],
                background: Sequence[int] = BACKGROUND) -> dict[str, dict]:
    """`case_dice` of every case of `references` (case -> label file); a missing prediction is an error."""
    from jaxseg.data.io import load_nifti
    from jaxseg.evaluation.evaluate import find_prediction

    out = {}
    for case, ref_path in sorted(references.items()):
        pred_path = find_prediction(pred_dir, case)
        if pred_path is None:
            raise FileNotFoundError(f"{pred_dir}: no prediction for {case}")
        pred, _, _ = load_nifti(pred_path)
        ref, _, _ = load_nifti(ref_path)
        out[case] = case_dice(np.rint(pred).astype(np.int64), np.rint(ref).astype(np.int64), labels, background)
    return out


def mean_scores(rows: Mapping[str, dict], labels: Sequence[int]) -> dict:
    """Means over cases of `score_cases`' output."""
    rows = list(rows.values())
    with np.errstate(all="ignore"):
        return {"all": float(np.nanmean([r["all"] for r in rows])), "fg": float(np.nanmean([r["fg"] for r in rows])),
                "per_class": {int(k): float(np.nanmean([r["per_class"][k] for r in rows])) for k in labels},
                "n": len(rows)}


def evaluate_split(pred_dir: Path, references: Mapping[str, Path], labels: Sequence[int],
                   background: Sequence[int] = BACKGROUND) -> dict:
    """Mean over cases of `case_dice` for every case of `references`."""
    return mean_scores(score_cases(pred_dir, references, labels, background), labels)


# ----------------------------------------------------------------------------------- the age effect


def age_effect(records, labels: Mapping[str, int]) -> list[dict]:
    """Per case, measured on its images and labels: brain volume (ml), ventricle volume (ml and % of
    the brain) and the WM - cortical GM contrast of the first channel (in units of the brain's
    intensity standard deviation). `records`: CaseRecords with labels and ages; `labels`: the synthetic tissue label names."""
    from jaxseg.data.io import load_nifti

    rows = []
    for rec in records:
        if rec.label is None or rec.age is None:
            continue
        label, affine, _ = load_nifti(rec.label)
        image, _, _ = load_nifti(rec.images[0])
        label = np.rint(label).astype(np.int64)
        vox_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
        brain = label > 0
        vent = label == labels["ventricles"]
        wm, gm = image[label == labels["white_matter"]], image[label == labels["cortical_gm"]]
        sd = float(image[brain].std()) or 1.0
        rows.append({"case": rec.case_id, "age": float(rec.age), "brain_ml": float(brain.sum() * vox_ml),
                     "ventricles_ml": float(vent.sum() * vox_ml),
                     "ventricles_pct": float(100.0 * vent.sum() / max(brain.sum(), 1)),
                     "wm_gm_contrast": float((wm.mean() - gm.mean()) / sd) if wm.size and gm.size else math.nan})
    return rows


def age_effect_figure(path: Path, rows: Sequence[Mapping]) -> None:
    """Scatter of each `age_effect` measure against age, with its Pearson correlation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    age = np.array([r["age"] for r in rows])
    panels = (("brain_ml", "brain volume (ml)"), ("ventricles_pct", "ventricles (% of brain)"),
              ("wm_gm_contrast", "WM - cortical GM (brain SDs, channel 0)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        y = np.array([r[key] for r in rows], float)
        ax.scatter(age, y, s=12)
        ok = np.isfinite(y)
        r = float(np.corrcoef(age[ok], y[ok])[0, 1]) if ok.sum() > 2 else math.nan
        ax.set_title(f"{title}\nPearson r = {r:.2f}", fontsize=9)
        ax.set_xlabel("age (weeks PMA)")
    fig.suptitle(f"Synthetic cohort: what changes with age ({len(rows)} subjects)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_age_effect(workdir: Path, records, labels: Mapping[str, int]) -> dict:
    """``age_effect.json`` and ``age_effect.png`` in `workdir`; returns the correlations with age."""
    import json

    rows = age_effect(records, labels)
    age = np.array([r["age"] for r in rows])
    corr = {k: float(np.corrcoef(age, [r[k] for r in rows])[0, 1])
            for k in ("brain_ml", "ventricles_pct", "wm_gm_contrast")} if len(rows) > 2 else {}
    write_text_atomic(workdir / "age_effect.json", json.dumps({"pearson_r_with_age": corr, "cases": rows},
                                                              indent=1) + "\n")
    age_effect_figure(workdir / "age_effect.png", rows)
    return corr
