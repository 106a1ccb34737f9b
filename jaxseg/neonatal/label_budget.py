"""The label-budgeting study (Richter & Fetit, the dHCP neonatal paper, Table 3) on the synthetic tissue cohort.

`run_label_budget(cfg, workdir)`: synth (tissue flavour) -> prepare -> per training seed (``seeds``), six
training runs at an equal budget of labelled 2D slices -> predict the validation and test splits with each
run's best checkpoint -> mean Dice with and without the background -> table of mean ± SD over seeds.

The settings (the paper's rows, and the paper's contrast of equal steps against equal epochs):

  random / sagittal / coronal / axial  "dispersed": every training subject of the fold, a fraction
                                       ``data.label_budget.fraction`` (1/3) of its slices labelled
                                       along that axis (``data.label_budget.enabled``; "random"
                                       draws the axis per subject), ``train.epochs x steps_per_epoch`` steps
  full                                 ``round(fraction * n)`` subjects fully labelled (label budget
                                       off, ``data.max_train_cases``): the same number of labelled
                                       slices on a third of the anatomy, the same steps (equal steps)
  full_epochs                          the same subjects for the same number of *epochs* over them as the
                                       dispersed runs, i.e. ``n_full / n`` of their steps: the paper trained
                                       every setting for 20 epochs, so its dispersed runs took ~3x the
                                       iterations of "full"

All share the validation cases (``data.fold`` of the training split), the test split, the model and the
optimiser. The dispersed subjects' slices are those the training loop masks
(``jaxseg.data.budget.slice_budget`` with the run's seed, so they change with the seed and the spread
includes the draw of slices). Every setting is compared with both "full" rows: the difference of the
seed means, starred when it exceeds the seed spread (`jaxseg.evaluation.seeds`). Each stage is skipped
when its output is complete (the cohort, the store, finished runs, written predictions), so a rerun
resumes a killed study. Runs: ``<workdir>/<setting>/seed<N>``.

Writes ``table.md`` (mean ± SD over seeds), ``table.csv`` (one row per setting and seed), ``table.json``
(per-seed rows, the summary, per-class Dice, timings) and ``budget.png`` into the workdir.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from jaxseg.evaluation.plots import save_figure
from jaxseg.evaluation.seeds import compare_seeds, fmt_diff, fmt_mean_sd, seed_columns
from jaxseg.config import save_config
from jaxseg.data.budget import AXES, slice_budget
from jaxseg.fileio import atomic_path, write_text_atomic
from jaxseg.neonatal.common import BACKGROUND, case_dice, evaluate_split, fmt as _fmt, image_folder, tissue_cohort
from jaxseg.neonatal.config import NeonatalConfig

# (row, data.label_budget.enabled, data.label_budget.axis); the paper's row order.
SETTINGS = (
    ("random", True, "random"),
    ("sagittal", True, "sagittal"),
    ("coronal", True, "coronal"),
    ("axial", True, "axial"),
    ("full", False, None),
    ("full_epochs", False, None),
)
DISPERSED = ("random", "sagittal", "coronal", "axial")
# The rows every setting is compared with: (row, what the comparison holds equal).
REFERENCES = (("full", "equal steps"), ("full_epochs", "equal epochs"))
# Paper Table 3, test mean Dice (Richter & Fetit; every setting at 20 epochs, so its "full" is full_epochs).
PAPER_TABLE3_TEST = {"random": 0.910, "sagittal": 0.900, "coronal": 0.913, "axial": 0.905, "full_epochs": 0.852}
COLUMNS = ("setting", "seed", "steps", "subjects", "labelled_slices", "labelled_voxels", "val_dice_all",
           "val_dice_fg", "test_dice_all", "test_dice_fg", "n_val", "n_test", "best_step", "train_val_dice")
METRICS = ("val_dice_all", "val_dice_fg", "test_dice_all", "test_dice_fg")


# ------------------------------------------------------------------------------------------ settings


def n_full_subjects(n_train: int, fraction: float) -> int:
    """Fully labelled subjects at the dispersed settings' slice budget: round(fraction * n), >= 1."""
    return max(1, int(math.floor(fraction * n_train + 0.5)))


def setting_config(cfg: NeonatalConfig, name: str, n_full: int, n_train: int | None = None) -> NeonatalConfig:
    """The run config of one setting (see the module docstring); ``full_epochs`` needs `n_train` (its
    steps per epoch are ``n_full / n_train`` of the others')."""
    enabled, axis = next((e, a) for n, e, a in SETTINGS if n == name)
    lb = cfg.data.label_budget
    lb = dataclasses.replace(lb, enabled=enabled, axis=axis or lb.axis)
    data = dataclasses.replace(cfg.data, label_budget=lb, max_train_cases=None if enabled else n_full)
    train = cfg.train
    if name == "full_epochs":
        if not n_train:
            raise ValueError("full_epochs needs the number of training subjects of the dispersed settings")
        train = dataclasses.replace(train, steps_per_epoch=max(1, round(train.steps_per_epoch * n_full / n_train)))
    return dataclasses.replace(cfg, experiment=f"{cfg.experiment}-{name}", data=data, train=train)


def labelled_counts(cfg: NeonatalConfig, shapes: Mapping[str, Sequence[int]], train_ids: Sequence[str]) -> dict:
    """Labelled subjects, 2D slices and voxels of a setting's training cases (``cfg`` from
    `setting_config`). A fully labelled subject counts its slices along the axial axis."""
    lb = cfg.data.label_budget
    slices = voxels = 0
    for c in train_ids:
        shape = tuple(int(v) for v in shapes[c])
        if lb.enabled:
            b = slice_budget(shape, lb.axis, lb.fraction, lb.exclude_border, seed=cfg.seed, case_id=c)
            slices, voxels = slices + b.n_slices, voxels + b.n_voxels
        else:
            slices, voxels = slices + shape[AXES["axial"]], voxels + math.prod(shape)
    return {"subjects": len(train_ids), "labelled_slices": slices, "labelled_voxels": voxels}


# -------------------------------------------------------------------------------------------- output


def summarise(rows: Sequence[Mapping]) -> list[dict]:
    """One row per setting (in `rows`' order) from the per-seed rows: each metric's per-seed values,
    mean and SD, and for each of `REFERENCES` the difference of the test Dice means (``vs_<ref>_<metric>``:
    `jaxseg.evaluation.seeds.compare_seeds`, B = this setting, A = the reference)."""
    names = list(dict.fromkeys(r["setting"] for r in rows))
    by = {n: [r for r in rows if r["setting"] == n] for n in names}
    out = []
    for n in names:
        rs = by[n]
        row = {"setting": n, "seeds": [r.get("seed") for r in rs], "steps": rs[0].get("steps"),
               "subjects": rs[0]["subjects"], "labelled_slices": float(np.mean([r["labelled_slices"] for r in rs])),
               "labelled_voxels": float(np.mean([r["labelled_voxels"] for r in rs]))}
        row.update(seed_columns(rs, METRICS))
        for ref, _ in REFERENCES:
            if ref in by and ref != n:
                for k in ("test_dice_all", "test_dice_fg"):
                    row[f"vs_{ref}_{k}"] = compare_seeds([r[k] for r in by[ref]], row[k])
        out.append(row)
    return out


def table_markdown(summary: Sequence[Mapping], notes: Sequence[str] = ()) -> str:
    """The paper's Table 3 layout, one row per setting: mean ± SD over seeds of the mean Dice (all classes,
    foreground) on the validation and test cases, the test foreground Dice's difference to each "full"
    row (* = beyond the seed spread), and the paper's test Dice."""
    refs = [r for r, _ in REFERENCES if any(s["setting"] == r for s in summary)]
    what = dict(REFERENCES)
    lines = ["| Setting | Steps | Training subjects | Labelled slices | Validation Dice (all classes) | "
             "Validation Dice (foreground) | Test Dice (all classes) | Test Dice (foreground) | " +
             "".join(f"Δ test fg vs {r} ({what[r]}) | " for r in refs) + "Paper Table 3 test Dice |",
             "|:---|---:|---:|---:|" + "---:|" * (4 + len(refs) + 1)]
    for r in summary:
        cells = [fmt_mean_sd(r[k]) for k in METRICS]
        cells += [fmt_diff(r[f"vs_{ref}_test_dice_fg"]) if f"vs_{ref}_test_dice_fg" in r else "-" for ref in refs]
        lines.append(f"| {r['setting']} | {r['steps']} | {r['subjects']} | {r['labelled_slices']:.0f} | "
                     + " | ".join(cells) + f" | {_fmt(PAPER_TABLE3_TEST.get(r['setting'], '-'))} |")
    return "\n".join(lines + ([""] + [f"{n}" for n in notes] if notes else [])) + "\n"


def write_table(workdir: str | os.PathLike, rows: Sequence[Mapping], *, per_class: Mapping | None = None,
                timings: Mapping | None = None, info: Mapping | None = None, notes: Sequence[str] = (),
                plot: bool = True) -> dict:
    """Write ``table.md``, ``table.csv``, ``table.json`` and (with `plot`) ``budget.png`` into `workdir`.

    `rows`: one mapping per setting and seed with the keys of ``COLUMNS`` (extra keys go to the JSON only).
    `per_class`: setting -> split -> {class name: Dice} (means over seeds). Returns the paths written.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    paths = {"markdown": workdir / "table.md", "csv": workdir / "table.csv", "json": workdir / "table.json"}
    write_text_atomic(paths["markdown"], table_markdown(summary, notes))
    with atomic_path(paths["csv"], suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6f}" if isinstance(r.get(k), float) else r.get(k)) for k in COLUMNS})
    record = {"rows": [dict(r) for r in rows], "summary": summary, "per_class": per_class or {},
              "timings": dict(timings or {}), "info": dict(info or {}), "paper_table3_test": PAPER_TABLE3_TEST}
    write_text_atomic(paths["json"], json.dumps(record, indent=1, default=str) + "\n")
    if plot:
        paths["plot"] = workdir / "budget.png"
        _plot(paths["plot"], summary, per_class or {})
    return paths


def _plot(path: Path, summary: Sequence[Mapping], per_class: Mapping) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [r["setting"] for r in summary]
    x = np.arange(len(settings))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    series = (("val_dice_all", "validation, all classes"), ("val_dice_fg", "validation, foreground"),
              ("test_dice_all", "test, all classes"), ("test_dice_fg", "test, foreground"))
    width = 0.8 / len(series)
    for j, (key, label) in enumerate(series):
        axes[0].bar(x + j * width, [r[f"{key}_mean"] for r in summary], width,
                    yerr=[r[f"{key}_sd"] for r in summary], capsize=2, label=label)
    paper = [PAPER_TABLE3_TEST.get(s, np.nan) for s in settings]
    axes[0].plot(x + 0.4 - width / 2, paper, "k_", markersize=28, mew=2, label="paper Table 3 (test)")
    axes[0].set_xticks(x + 0.4 - width / 2, [f"{r['setting']}\n{r['subjects']} subj., {r['steps']} steps"
                                             for r in summary], fontsize=7)
    axes[0].set_ylabel("mean Dice (mean ± SD over seeds)")
    axes[0].set_ylim(0, 1.2)
    axes[0].set_yticks(np.linspace(0, 1, 6))
    axes[0].legend(fontsize=7, loc="upper center", ncol=3)
    axes[0].set_title(f"Mean Dice per setting (equal slice budget; {len(summary[0]['seeds'])} seeds)")
    classes = list(dict.fromkeys(c for s in settings for c in per_class.get(s, {}).get("test", {})))
    if classes:
        width = 0.8 / len(settings)
        for j, s in enumerate(settings):
            vals = [per_class.get(s, {}).get("test", {}).get(c, np.nan) for c in classes]
            axes[1].bar(np.arange(len(classes)) + j * width, vals, width, label=s)
        axes[1].set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, fontsize=7, rotation=30)
        axes[1].set_ylim(0, 1.2)
        axes[1].set_yticks(np.linspace(0, 1, 6))
        axes[1].legend(fontsize=7, loc="upper center", ncol=6)
    axes[1].set_ylabel("test Dice (mean over seeds)")
    axes[1].set_title("Per-class test Dice")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- the study


def _setting_row(run_cfg, name, workdir, train_ids, val_ids, shapes, refs, eval_images, labels, timings,
                 progress) -> tuple[dict, dict]:
    """Train, predict and score one setting at ``run_cfg.seed``: (its table row, its scores per split)."""
    from jaxseg.data.splits import limit_cases
    from jaxseg.inference.runs import predict_with_runs
    from jaxseg.train.loop import train_and_evaluate

    run_dir, tag = workdir / name / f"seed{run_cfg.seed}", f"{name}_seed{run_cfg.seed}"
    run_ids = limit_cases(train_ids, run_cfg.data.max_train_cases, run_cfg.data.split_seed)
    t = time.perf_counter()
    out = train_and_evaluate(run_cfg, run_dir, progress=progress)
    timings[f"train_{tag}_s"] = time.perf_counter() - t
    if list(out["train_cases"]) != list(run_ids) or list(out["val_cases"]) != list(val_ids):
        raise RuntimeError(f"{name}: the run trained on other cases than the study counted")
    t = time.perf_counter()
    predict_with_runs([run_dir], eval_images, run_dir / "predictions", progress=progress, skip_existing=True)
    timings[f"predict_{tag}_s"] = time.perf_counter() - t
    scores = {split: evaluate_split(run_dir / "predictions", refs[split], list(labels.values()))
              for split in ("val", "test")}
    row = {"setting": name, "seed": run_cfg.seed, "steps": run_cfg.train.epochs * run_cfg.train.steps_per_epoch,
           **labelled_counts(run_cfg, shapes, run_ids),
           "val_dice_all": scores["val"]["all"], "val_dice_fg": scores["val"]["fg"],
           "test_dice_all": scores["test"]["all"], "test_dice_fg": scores["test"]["fg"],
           "n_val": scores["val"]["n"], "n_test": scores["test"]["n"], "best_step": out["best"].get("step"),
           "train_val_dice": out["best"].get("val_dice"), "train_s": timings[f"train_{tag}_s"]}
    return row, scores


def run_label_budget(cfg: NeonatalConfig, workdir: str | os.PathLike, *, progress: bool = True,
                     log: Callable[[str], None] = print) -> dict:
    from jaxseg.data.datasets import read_dataset
    from jaxseg.data.pipeline import CaseSource
    from jaxseg.data.splits import kfold_split

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, workdir / "config.yaml")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    cfg = tissue_cohort(cfg, workdir, progress=progress, timings=timings)
    raw, store_dir = Path(cfg.data.dataset), Path(cfg.data.store)

    dataset = read_dataset(raw)
    labels = {str(k): int(v) for k, v in dataset.labels.items()}
    names = {v: k for k, v in labels.items()}
    source = CaseSource(store_dir, split="train")
    shapes = dict(zip(source.case_ids, source.shapes))
    train_ids, val_ids = kfold_split(source.case_ids, cfg.data.fold, cfg.data.num_folds, cfg.data.split_seed)
    if not val_ids:
        raise ValueError("the label-budget study selects each run's best checkpoint on validation cases: "
                         "data.fold must be a fold number, not 'all'")
    n_full = n_full_subjects(len(train_ids), cfg.data.label_budget.fraction)
    records = {c.case_id: c for c in dataset.cases}
    refs = {"val": {c: records[c].label for c in val_ids},
            "test": {c.case_id: c.label for c in dataset.cases if c.split == "test"}}
    # One folder of the validation and test images: one predict call (one compile) per run.
    eval_images = image_folder(workdir / "data" / "eval_images",
                               [records[c] for split in ("val", "test") for c in refs[split]])
    log(f"label budget: {len(train_ids)} training subjects ({n_full} fully labelled for 'full'), "
        f"{len(val_ids)} validation, {len(refs['test'])} test; "
        f"{cfg.train.epochs * cfg.train.steps_per_epoch} steps per run")

    seeds = list(cfg.seeds) if cfg.seeds is not None else [cfg.seed]
    rows, class_scores = [], {}
    for seed in seeds:
        for name, _, _ in SETTINGS:
            run_cfg = setting_config(dataclasses.replace(cfg, seed=seed, seeds=None), name, n_full, len(train_ids))
            row, scores = _setting_row(run_cfg, name, workdir, train_ids, val_ids, shapes, refs, eval_images, labels,
                                       timings, progress)
            class_scores.setdefault(name, []).append(scores)
            rows.append(row)
            log(f"{name} (seed {seed}): {row['subjects']} subjects, {row['labelled_slices']} labelled slices, "
                f"{row['steps']} steps; Dice all/fg validation {row['val_dice_all']:.3f}/{row['val_dice_fg']:.3f}, "
                f"test {row['test_dice_all']:.3f}/{row['test_dice_fg']:.3f}")
    per_class = {name: {split: {names[k]: float(np.nanmean([sc[split]["per_class"][k] for sc in runs]))
                                for k in labels.values()} for split in ("val", "test")}
                 for name, runs in class_scores.items()}
    timings["total_s"] = time.perf_counter() - t_start
    steps = cfg.train.epochs * cfg.train.steps_per_epoch
    info = {"n_train": len(train_ids), "n_full": n_full, "n_val": len(val_ids), "n_test": len(refs["test"]),
            "seeds": seeds, "fraction": cfg.data.label_budget.fraction, "exclude_border": cfg.data.label_budget.exclude_border,
            "steps": steps, "batch_size": cfg.data.batch_size, "patch_size": list(cfg.data.patch_size),
            "background": list(BACKGROUND), "labels": labels}
    full_steps = next((r["steps"] for r in rows if r["setting"] == "full_epochs"), "-")
    notes = [f"Equal budget of labelled slices: 'full' = {n_full} of the {len(train_ids)} training subjects fully "
             f"labelled; the dispersed rows label {cfg.data.label_budget.fraction:.3g} of the slices of every subject "
             f"along the axis named (random: one axis per subject), never in the outer "
             f"{cfg.data.label_budget.exclude_border:.0%} of the axis. 'full' counts its slices along the axial axis. "
             f"Steps x batch {cfg.data.batch_size}, patch {'x'.join(map(str, cfg.data.patch_size))}: {steps} for the "
             f"dispersed rows and 'full' (equal steps), {full_steps} for 'full_epochs' (equal epochs: as many passes "
             f"over its {n_full} subjects as the dispersed runs make over their {len(train_ids)}, the paper's contrast).",
             f"Mean ± SD over {len(seeds)} training seeds {seeds} (each seed also draws the dispersed slices) of the "
             f"mean Dice over {len(val_ids)} validation and {len(refs['test'])} test cases with each run's best "
             f"checkpoint; 'all classes' includes the background (class 0), 'foreground' leaves it out. Δ = this row's "
             f"mean minus the reference row's; * = |Δ| exceeds the seed spread (SD + SD).",
             "Paper: Richter & Fetit Table 3 (dHCP, 20 epochs for every setting, so its 'full' is 'full_epochs').",
             f"Total {timings['total_s'] / 60:.1f} min for this invocation "
             "(a rerun skips the stages already complete)."]
    paths = write_table(workdir, rows, per_class=per_class, timings=timings, info=info, notes=notes)
    return {"rows": rows, "summary": summarise(rows), "per_class": per_class, "timings": timings,
            **{k: str(v) for k, v in paths.items()}}
