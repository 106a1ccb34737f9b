"""The AgeU-Net study (Richter & Fetit, the dHCP neonatal paper, section 3.3) on the synthetic tissue cohort.

`run_age_study(cfg, workdir)`: synth (tissue flavour, ages 26-45 weeks PMA) -> prepare -> the
figure of the cohort's age effect -> per training seed (``seeds``), four runs with the same data, steps
and segmentation settings (``<workdir>/<model>/seed<N>``):

  unet               the segmentation U-Net alone (``model.age_head`` off): the Dice reference
  ageunet            AgeU-Net as printed: one learning rate, the head's output starts near 0 weeks
  ageunet_head_lr    + the head's own learning rate (``optim.age_head_lr``; the paper's suggestion
                     for its diverging MSE)
  ageunet_centred    + the head's output centred on the training ages (``model.age_offset`` /
                     ``age_scale`` = their mean / SD), so the untrained head predicts the mean age

-> each run's best checkpoint (validation Dice) predicts the test split (label maps and the mean of
the window ages) -> test Dice (all classes, foreground), age MAE / MSE / Pearson r / SD of the
predictions beside the mean-age baseline (the training ages' mean for every test case; the paper
found its head collapsed to it). The table gives each number as mean ± SD over the seeds, and each
AgeU-Net's difference to the U-Net's Dice and to the baseline's MAE, starred when it exceeds the seed
spread (`jaxseg.evaluation.seeds`). Every stage is skipped when its output is complete, so a rerun
resumes a killed study.

Writes ``table.md``, ``table.csv`` (one row per model and seed), ``table.json`` (rows, summary, per-case
ages, timings), ``age.png`` (predicted vs true age, test Dice) and ``age_effect.png`` /
``age_effect.json`` into the workdir.
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

from jaxseg.config import save_config
from jaxseg.evaluation.plots import save_figure
from jaxseg.evaluation.seeds import compare_seeds, fmt_diff, fmt_mean_sd, seed_columns
from jaxseg.fileio import atomic_path, write_text_atomic
from jaxseg.neonatal.common import fmt, image_folder, mean_scores, score_cases, tissue_cohort, write_age_effect
from jaxseg.neonatal.config import NeonatalConfig

# (row, model.age_head, own head lr, centred head); the order of the table.
VARIANTS = (
    ("unet", False, False, False),
    ("ageunet", True, False, False),
    ("ageunet_head_lr", True, True, False),
    ("ageunet_centred", True, True, True),
)
COLUMNS = ("model", "seed", "age_head_lr", "age_offset", "age_scale", "test_dice_all", "test_dice_fg", "age_mae",
           "age_mse", "age_r", "age_pred_sd", "baseline_mae", "baseline_mse", "n_test", "best_step",
           "train_val_dice")
# Paper (dHCP, 60 epochs): AgeU-Net test Dice 0.866 without the backgrounds, below the U-Net's 0.917;
# validation MSE 2.45 (MAE 1.57 weeks) that did not carry to the test set, where the head predicted
# about the mean age.
PAPER = {"unet_dice_fg": 0.917, "ageunet_dice_fg": 0.866, "ageunet_val_mse": 2.45, "ageunet_val_mae": 1.57}
METRICS = ("test_dice_all", "test_dice_fg", "age_mae", "age_mse", "age_r", "age_pred_sd")


def variant_config(cfg: NeonatalConfig, name: str, train_ages: Sequence[float]) -> NeonatalConfig:
    """The run config of one row (see the module docstring); `train_ages` centre the centred head."""
    _, head, own_lr, centred = next(v for v in VARIANTS if v[0] == name)
    if head and own_lr and cfg.optim.age_head_lr is None:
        raise ValueError(f"{name} needs optim.age_head_lr (the age head's own learning rate)")
    offset, scale = (float(np.mean(train_ages)), float(np.std(train_ages)) or 1.0) if centred else (0.0, 1.0)
    model = dataclasses.replace(cfg.model, age_head=head, age_offset=offset, age_scale=scale)
    optim = dataclasses.replace(cfg.optim, age_head_lr=cfg.optim.age_head_lr if (head and own_lr) else None)
    return dataclasses.replace(cfg, experiment=f"{cfg.experiment}-{name}", model=model, optim=optim)


def age_metrics(pred: Mapping[str, float], true: Mapping[str, float], baseline: float) -> dict:
    """MAE, MSE, Pearson r and SD of `pred` against `true` (weeks), and the MAE / MSE of predicting
    `baseline` for every case."""
    cases = sorted(true)
    p = np.array([pred[c] for c in cases], float)
    t = np.array([true[c] for c in cases], float)
    r = float(np.corrcoef(p, t)[0, 1]) if len(cases) > 2 and p.std() > 0 and t.std() > 0 else math.nan
    return {"age_mae": float(np.mean(np.abs(p - t))), "age_mse": float(np.mean((p - t) ** 2)), "age_r": r,
            "age_pred_sd": float(p.std()), "baseline_mae": float(np.mean(np.abs(baseline - t))),
            "baseline_mse": float(np.mean((baseline - t) ** 2))}


def read_ages_csv(path: Path) -> dict[str, float]:
    with open(path, newline="") as f:
        return {row["case"]: float(row["predicted_age"]) for row in csv.DictReader(f)}


# -------------------------------------------------------------------------------------------- output


def summarise(rows: Sequence[Mapping]) -> list[dict]:
    """One row per model from the per-seed rows: each metric's per-seed values, mean and SD; the
    AgeU-Nets' Dice against the U-Net's (``vs_unet_<metric>``) and MAE against the mean-age baseline
    (``vs_baseline_mae``), each a `compare_seeds` (B = this model)."""
    names = list(dict.fromkeys(r["model"] for r in rows))
    by = {n: [r for r in rows if r["model"] == n] for n in names}
    out = []
    for n in names:
        rs = by[n]
        row = {k: rs[0][k] for k in ("model", "age_head_lr", "age_offset", "age_scale", "baseline_mae", "baseline_mse")}
        row["seeds"] = [r.get("seed") for r in rs]
        row.update(seed_columns(rs, METRICS))
        if n != "unet":
            if "unet" in by:
                for k in ("test_dice_all", "test_dice_fg"):
                    row[f"vs_unet_{k}"] = compare_seeds([r[k] for r in by["unet"]], row[k])
            row["vs_baseline_mae"] = compare_seeds([r["baseline_mae"] for r in rs], row["age_mae"])
        out.append(row)
    return out


def table_markdown(summary: Sequence[Mapping], notes: Sequence[str] = ()) -> str:
    lines = ["| Model | Age-head lr | Head output | Test Dice (all classes) | Test Dice (foreground) | "
             "Δ fg vs unet | Age MAE (weeks) | Δ MAE vs baseline | Age MSE | Pearson r | SD of predicted ages | "
             "Mean-age baseline MAE / MSE |",
             "|:---|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        head = r["model"] != "unet"
        init = (f"{r['age_offset']:.1f} + {r['age_scale']:.2f} x head" if r["age_offset"] else "head") if head else "-"
        lr = fmt(r["age_head_lr"], 4) if r["age_head_lr"] else ("shared" if head else "-")
        age = (lambda k: fmt_mean_sd(r[k], 2) if head else "-")
        cmp = (lambda k: fmt_diff(r[k]) if k in r else "-")
        lines.append(f"| {r['model']} | {lr} | {init} | {fmt_mean_sd(r['test_dice_all'])} | "
                     f"{fmt_mean_sd(r['test_dice_fg'])} | {cmp('vs_unet_test_dice_fg')} | {age('age_mae')} | "
                     f"{cmp('vs_baseline_mae')} | {age('age_mse')} | {age('age_r')} | {age('age_pred_sd')} | "
                     f"{fmt(r['baseline_mae'], 2)} / {fmt(r['baseline_mse'], 2)} |")
    return "\n".join(lines + ([""] + list(notes) if notes else [])) + "\n"


def write_table(workdir: Path, rows: Sequence[Mapping], *, ages: Mapping, true_ages: Mapping, baseline: float,
                timings: Mapping, info: Mapping, notes: Sequence[str] = ()) -> dict:
    """`rows`: one per model and seed; `ages`: seed -> model -> case -> predicted age."""
    paths = {"markdown": workdir / "table.md", "csv": workdir / "table.csv", "json": workdir / "table.json",
             "plot": workdir / "age.png"}
    summary = summarise(rows)
    write_text_atomic(paths["markdown"], table_markdown(summary, notes))
    with atomic_path(paths["csv"], suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6f}" if isinstance(r.get(k), float) else r.get(k)) for k in COLUMNS})
    record = {"rows": [dict(r) for r in rows], "summary": summary, "predicted_ages": ages,
              "true_ages": dict(true_ages), "baseline_age": baseline, "timings": dict(timings), "info": dict(info),
              "paper": PAPER}
    write_text_atomic(paths["json"], json.dumps(record, indent=1, default=str) + "\n")
    _plot(paths["plot"], summary, ages, true_ages, baseline)
    return paths


def _plot(path: Path, summary: Sequence[Mapping], ages: Mapping, true_ages: Mapping, baseline: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    cases = sorted(true_ages)
    t = np.array([true_ages[c] for c in cases])
    lo, hi = float(t.min()) - 2, float(t.max()) + 2
    first = next(iter(ages), None)  # the scatter shows the first seed's predictions
    for name, pred in (ages[first].items() if first is not None else ()):
        p = np.array([pred[c] for c in cases])
        row = next(r for r in summary if r["model"] == name)
        axes[0].scatter(t, p, s=14, label=f"{name} (MAE {fmt_mean_sd(row['age_mae'], 2)} over seeds)")
    axes[0].plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")
    axes[0].axhline(baseline, color="grey", lw=1, label=f"mean training age {baseline:.1f}")
    axes[0].set_xlim(lo, hi)
    axes[0].set_xlabel("true age (weeks PMA)")
    axes[0].set_ylabel("predicted age (mean of the windows)")
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"Test cases ({len(cases)}): predicted vs true age (seed {first})")
    names = [r["model"] for r in summary]
    x = np.arange(len(names))
    for off, key, label in ((-0.2, "test_dice_all", "all classes"), (0.2, "test_dice_fg", "foreground")):
        axes[1].bar(x + off, [r[f"{key}_mean"] for r in summary], 0.4, yerr=[r[f"{key}_sd"] for r in summary],
                    capsize=3, label=label)
    axes[1].set_xticks(x, names, fontsize=8)
    axes[1].set_ylim(0, 1)
    axes[1].set_ylabel("test Dice (mean ± SD over seeds)")
    axes[1].legend(fontsize=8)
    axes[1].set_title("Segmentation: does the age pathway help?")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- the study


def _variant_row(cfg, name, head, workdir, train_ages, baseline, true_ages, eval_images, records, labels, timings,
                 ages, progress, log) -> dict:
    """Train, predict and score one model at ``cfg.seed``; fills `timings` and ``ages[seed][name]``."""
    from jaxseg.inference.runs import predict_with_runs
    from jaxseg.train.loop import train_and_evaluate

    run_cfg = variant_config(cfg, name, train_ages)
    run_dir, tag = workdir / name / f"seed{cfg.seed}", f"{name}_seed{cfg.seed}"
    test = sorted(true_ages)
    t = time.perf_counter()
    out = train_and_evaluate(run_cfg, run_dir, progress=progress)
    timings[f"train_{tag}_s"] = time.perf_counter() - t
    pred_dir = run_dir / "predictions"
    t = time.perf_counter()
    # Kept predictions carry no age, so the folder is reused only when its ages.csv is complete.
    done = (not head or (pred_dir / "ages.csv").is_file() and set(read_ages_csv(pred_dir / "ages.csv")) >= set(test))
    predict_with_runs([run_dir], eval_images, pred_dir, progress=progress, skip_existing=done)
    timings[f"predict_{tag}_s"] = time.perf_counter() - t
    scores = mean_scores(score_cases(pred_dir, {c: records[c].label for c in test}, list(labels.values())),
                         list(labels.values()))
    row = {"model": name, "seed": cfg.seed, "age_head_lr": run_cfg.optim.age_head_lr,
           "age_offset": run_cfg.model.age_offset, "age_scale": run_cfg.model.age_scale,
           "test_dice_all": scores["all"], "test_dice_fg": scores["fg"], "n_test": scores["n"],
           "best_step": out["best"].get("step"), "train_val_dice": out["best"].get("val_dice"),
           "train_s": timings[f"train_{tag}_s"], "per_class": {k: scores["per_class"][v] for k, v in labels.items()}}
    m = {"age_mae": math.nan, "age_mse": math.nan, "age_r": math.nan, "age_pred_sd": math.nan,
         **{k: v for k, v in age_metrics(true_ages, true_ages, baseline).items() if k.startswith("baseline")}}
    if head:
        pred = {c: v for c, v in read_ages_csv(pred_dir / "ages.csv").items() if c in true_ages}
        ages.setdefault(cfg.seed, {})[name] = pred
        m = age_metrics(pred, true_ages, baseline)
    row.update(m)
    log(f"{name} (seed {cfg.seed}): test Dice all/fg {row['test_dice_all']:.3f}/{row['test_dice_fg']:.3f}" +
        (f"; age MAE {row['age_mae']:.2f} (baseline {row['baseline_mae']:.2f}), r {row['age_r']:.2f}"
         if head else ""))
    return row


def run_age_study(cfg: NeonatalConfig, workdir: str | os.PathLike, *, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """The AgeU-Net study (module docstring) in `workdir`; returns its rows and timings. Long: one study read
    top to bottom (cases, each setting's training, prediction, scores, table), each stage resumable."""
    from jaxseg.data.datasets import read_dataset
    from jaxseg.data.pipeline import CaseSource
    from jaxseg.data.splits import select_cases

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, workdir / "config.yaml")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    cfg = tissue_cohort(cfg, workdir, progress=progress, timings=timings)
    dataset = read_dataset(Path(cfg.data.dataset))
    labels = {str(k): int(v) for k, v in dataset.labels.items()}
    records = {c.case_id: c for c in dataset.cases}
    t = time.perf_counter()
    corr = write_age_effect(workdir, dataset.cases, labels)
    timings["age_effect_s"] = time.perf_counter() - t
    log("age effect of the cohort (Pearson r with age): " + ", ".join(f"{k} {v:+.2f}" for k, v in corr.items()))

    source = CaseSource(Path(cfg.data.store), split="train")
    train_ids, val_ids = select_cases(source.case_ids, cfg, cfg.data.store)
    if not val_ids:
        raise ValueError("the age study selects each run's best checkpoint on validation cases: data.fold must "
                         "be a fold number, not 'all'")
    test = sorted(c.case_id for c in dataset.cases if c.split == "test")
    missing = [c for c in [*train_ids, *test] if records[c].age is None]
    if missing:
        raise ValueError(f"{cfg.data.dataset}: case {missing[0]!r} has no age in the metadata")
    train_ages = [records[c].age for c in train_ids]
    baseline = float(np.mean(train_ages))
    true_ages = {c: float(records[c].age) for c in test}
    eval_images = image_folder(workdir / "data" / "test_images", [records[c] for c in test])
    log(f"age study: {len(train_ids)} training, {len(val_ids)} validation, {len(test)} test subjects; training ages "
        f"{min(train_ages):.1f}-{max(train_ages):.1f} weeks (mean {baseline:.2f}); "
        f"{cfg.train.epochs * cfg.train.steps_per_epoch} steps per run")

    seeds = list(cfg.seeds) if cfg.seeds is not None else [cfg.seed]
    rows, ages = [], {}
    for seed in seeds:
        for name, head, _, _ in VARIANTS:
            rows.append(_variant_row(dataclasses.replace(cfg, seed=seed, seeds=None), name, head, workdir,
                                     train_ages, baseline, true_ages, eval_images, records, labels, timings, ages,
                                     progress, log))
    timings["total_s"] = time.perf_counter() - t_start
    steps = cfg.train.epochs * cfg.train.steps_per_epoch
    info = {"n_train": len(train_ids), "n_val": len(val_ids), "n_test": len(test), "steps": steps, "seeds": seeds,
            "batch_size": cfg.data.batch_size, "patch_size": list(cfg.data.patch_size),
            "age_weight": cfg.loss.age_weight, "lr": cfg.optim.lr, "optimizer": cfg.optim.kind,
            "age_effect_pearson_r": corr, "labels": labels}
    notes = [f"{len(train_ids)} training / {len(val_ids)} validation / {len(test)} test synthetic subjects, "
             f"{steps} steps x batch {cfg.data.batch_size} of {'x'.join(map(str, cfg.data.patch_size))} patches per run "
             f"({cfg.optim.kind}, lr {cfg.optim.lr:g}); loss = DiceCE (deep supervision) + "
             f"{cfg.loss.age_weight:g} x age MSE; each run's best checkpoint by validation Dice.",
             f"Mean ± SD over {len(seeds)} training seeds {seeds} of each run's test figures. Δ = the row's mean minus "
             "the U-Net's (Dice) or the baseline's (MAE; lower is better); * = |Δ| exceeds the seed spread (SD + SD).",
             "Predicted age = mean of the sliding-window predictions. Mean-age baseline = the training ages' mean "
             f"({baseline:.2f} weeks) for every test case.",
             "Paper (dHCP, 60 epochs): AgeU-Net test Dice 0.866 (foreground) vs 0.917 for the U-Net; validation MSE "
             "2.45 / MAE 1.57 weeks, but on the test set the head predicted about the mean age.",
             f"Total {timings['total_s'] / 60:.1f} min for this invocation "
             "(a rerun skips the stages already complete)."]
    paths = write_table(workdir, rows, ages=ages, true_ages=true_ages, baseline=baseline, timings=timings,
                        info=info, notes=notes)
    return {"rows": rows, "timings": timings, **{k: str(v) for k, v in paths.items()}}
