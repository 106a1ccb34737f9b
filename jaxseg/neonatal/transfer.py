"""The transfer-learning study (Richter & Fetit section 3.5, Table 4 / Figure 11) on the
synthetic tissue cohort.

`run_transfer_study(cfg, workdir)`: synth (tissue flavour, ages 26-45 weeks) -> prepare -> roles by
age (``cfg.transfer``): the ``n_old`` oldest subjects pre-train (``n_old_val`` of them validate), the
``n_young`` youngest are split into ``n_finetune`` fine-tuning subjects and a test set -> one
pre-training run (``train.*``, ``optim.*``, ``seed``) -> per seed (``seeds``), one run per strategy on the fine-tuning
subjects (``transfer.finetune_steps`` each, no validation: the last checkpoint):

  none                 the pre-trained model, evaluated as is (one run, as in the paper)
  shallow/medium/deep  ``train.finetune``: the bottleneck and its adjacent level / + one more level /
                       every level but the outermost train, the rest stay bit-for-bit frozen
  full                 every parameter trains from the pre-trained ones (``transfer.finetune_lr``)
  scratch              a fresh network on the fine-tuning subjects (``transfer.scratch_lr`` or
                       ``optim.lr``), the same steps

-> every run predicts the young test subjects -> Dice per tissue per case.

Outputs (workdir): ``table.md`` (Table 4 layout: per-tissue Dice, mean +- SD over the seeds' runs;
the differences of the run means, starred beyond the seed spread; and the Bonferroni-corrected p-values
of paired t-tests over the test cases between every pair of strategies, on all classes and on the
foreground as the paper's Tables 5 and 6), ``table.csv``, ``table.json``
(per-run and per-case scores, roles, timings), ``transfer.png`` (Figure 11 layout) and the cohort's
``age_effect.png``. Every stage is skipped when its output is complete, so a rerun resumes.

The t-tests are paired over the test cases, each case's Dice first averaged over a strategy's runs
(seeds; ``none``: one run), so a case counts once: pooling seeds x cases would count each case once per
seed and overstate significance. The seed spread is the other test: two strategies differ beyond it
when their run means' mean ± SD intervals do not overlap.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from jaxseg.config import save_config
from jaxseg.evaluation.plots import save_figure
from jaxseg.evaluation.seeds import case_means, compare_seeds, fmt_diff, fmt_p, pairwise_paired
from jaxseg.fileio import atomic_path, write_text_atomic
from jaxseg.neonatal.common import BACKGROUND, fmt, image_folder, score_cases, tissue_cohort, write_age_effect
from jaxseg.neonatal.config import NeonatalConfig

FINETUNED = ("shallow", "medium", "deep", "full")


def assign_roles(ages: Mapping[str, float], tc, seed: int) -> dict[str, list[str]]:
    """Roles by age: the `tc.n_old` oldest -> ``old_train`` / ``old_val`` (`tc.n_old_val`, drawn with
    `seed`), the `tc.n_young` youngest -> ``finetune`` (`tc.n_finetune`, drawn) / ``test``. Ties in age
    go by case id. Each list sorted."""
    if tc.n_old + tc.n_young > len(ages):
        raise ValueError(f"transfer.n_old + transfer.n_young = {tc.n_old + tc.n_young} but the cohort has "
                         f"{len(ages)} subjects with an age")
    order = sorted(ages, key=lambda c: (ages[c], c))
    young, old = order[:tc.n_young], order[len(order) - tc.n_old:]
    rng = np.random.default_rng(seed)
    old_val = set(rng.choice(old, tc.n_old_val, replace=False).tolist())
    ft = set(rng.choice(young, tc.n_finetune, replace=False).tolist())
    return {"old_train": sorted(c for c in old if c not in old_val), "old_val": sorted(old_val),
            "finetune": sorted(ft), "test": sorted(c for c in young if c not in ft)}


def pretrain_config(cfg: NeonatalConfig, roles: Mapping[str, Sequence[str]]) -> NeonatalConfig:
    data = dataclasses.replace(cfg.data, train_cases=tuple(roles["old_train"]), val_cases=tuple(roles["old_val"]))
    train = dataclasses.replace(cfg.train, init_from=None, finetune="full")
    return dataclasses.replace(cfg, experiment=f"{cfg.experiment}-pretrain", data=data, train=train)


def strategy_config(cfg: NeonatalConfig, strategy: str, seed: int, roles: Mapping[str, Sequence[str]],
                    pretrained: Path) -> NeonatalConfig:
    """One fine-tuning (or from-scratch) run: the fine-tuning subjects, no validation, the last checkpoint."""
    tc = cfg.transfer
    if strategy not in (*FINETUNED, "scratch"):
        raise ValueError(f"strategy {strategy!r} trains nothing (use the pre-trained run for 'none')")
    steps = tc.finetune_steps
    data = dataclasses.replace(cfg.data, train_cases=tuple(roles["finetune"]), val_cases=None)
    train = dataclasses.replace(cfg.train, epochs=1, steps_per_epoch=steps, val_every=1,
                                checkpoint_every=steps, log_every=min(cfg.train.log_every, steps),
                                init_from=None if strategy == "scratch" else str(pretrained),
                                finetune="full" if strategy == "scratch" else strategy)
    lr = (tc.scratch_lr or cfg.optim.lr) if strategy == "scratch" else tc.finetune_lr
    optim = dataclasses.replace(cfg.optim, lr=lr)
    return dataclasses.replace(cfg, experiment=f"{cfg.experiment}-{strategy}-seed{seed}", seed=seed, data=data,
                               train=train, optim=optim)


# ---------------------------------------------------------------------------------------- statistics


def paired_tests(summary: Mapping, what: str) -> dict[tuple[str, str], float]:
    """Bonferroni-corrected p-values of paired t-tests over the test cases between every pair of
    strategies, on each case's Dice averaged over the strategy's runs (`what`: ``all`` or ``fg``)."""
    return pairwise_paired({s: v[f"case_means_{what}"] for s, v in summary.items()}, test="t")


def spread_pairs(summary: Mapping, what: str) -> dict[tuple[str, str], dict]:
    """`compare_seeds` of the run means of every pair (B = the second strategy)."""
    return {(a, b): compare_seeds(summary[a]["per_run"][what], summary[b]["per_run"][what])
            for a, b in itertools.combinations(summary, 2)}


def summarise(runs: Mapping[str, Sequence[Mapping]], class_names: Mapping[int, str]) -> dict:
    """Per strategy: mean and SD over its runs of the run-level mean Dice (all, fg, per class), and each
    case's Dice averaged over the runs (``case_means_all`` / ``_fg``, for the paired tests). `runs`:
    strategy -> [{"cases": {case: case_dice}}, ...] (every run of the same cases)."""
    out = {}
    for strategy, rs in runs.items():
        def run_mean(r, key):
            return float(np.nanmean([c[key] if key in ("all", "fg") else c["per_class"][key]
                                     for c in r["cases"].values()]))
        keys = ["all", "fg", *class_names]
        per_run = {k: [run_mean(r, k) for r in rs] for k in keys}
        out[strategy] = {
            "n_runs": len(rs),
            "mean": {str(k): float(np.mean(v)) for k, v in per_run.items()},
            "sd": {str(k): (float(np.std(v, ddof=1)) if len(v) > 1 else math.nan) for k, v in per_run.items()},
            "per_run": {str(k): v for k, v in per_run.items()},
            **{f"case_means_{k}": case_means([{c: v[k] for c, v in r["cases"].items()} for r in rs])
               for k in ("all", "fg")},
        }
    return out


# -------------------------------------------------------------------------------------------- output


def _cell(s: Mapping, key: str) -> str:
    m, sd = s["mean"][key], s["sd"][key]
    return f"{m:.3f}" if math.isnan(sd) else f"{m:.3f} ± {sd:.3f}"


def table_markdown(summary: Mapping, class_names: Mapping[int, str], tests: Mapping[str, Mapping],
                   notes: Sequence[str] = ()) -> str:
    fg = [k for k in class_names if k not in BACKGROUND]
    lines = ["### Dice per tissue (Table 4 layout): mean ± SD over runs",
             "",
             "| Strategy | Runs | " + " | ".join(class_names[k] for k in fg) + " | Mean (all classes) | "
             "Mean (foreground) |",
             "|:---|---:|" + "---:|" * (len(fg) + 2)]
    for strategy, s in summary.items():
        lines.append(f"| {strategy} | {s['n_runs']} | " + " | ".join(_cell(s, str(k)) for k in fg) +
                     f" | {_cell(s, 'all')} | {_cell(s, 'fg')} |")
    names = list(summary)
    for what, title in (("all", "all classes"), ("fg", "foreground")):
        spread = spread_pairs(summary, what)
        lines += ["", f"### Differences of the run means, {title}: column − row, * beyond the seed spread", "",
                  "| | " + " | ".join(names[1:]) + " |", "|:---|" + "---:|" * (len(names) - 1)]
        for i, a in enumerate(names[:-1]):
            cells = [(fmt_diff(spread[(a, b)]) if j > i else "") for j, b in enumerate(names) if j >= 1]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    for what, title in (("all", "all classes (Table 5)"), ("fg", "foreground (Table 6)")):
        lines += ["", f"### Bonferroni-corrected p-values, paired t-tests over the test cases (each case's Dice "
                      f"averaged over the seeds), {title}", "",
                  "| | " + " | ".join(names[1:]) + " |", "|:---|" + "---:|" * (len(names) - 1)]
        for i, a in enumerate(names[:-1]):
            cells = [(fmt_p(tests[what].get((a, b))) if j > i else "") for j, b in enumerate(names) if j >= 1]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + list(notes) if notes else [])) + "\n"


def _plot(path: Path, summary: Mapping) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "all", "(A) mean Dice, all classes"),
                           (axes[1], "fg", "(B) mean Dice, background excluded")):
        means = [summary[n]["mean"][key] for n in names]
        sds = [0.0 if math.isnan(summary[n]["sd"][key]) else summary[n]["sd"][key] for n in names]
        colors = ["tab:orange" if n == "none" else "tab:blue" for n in names]
        ax.bar(x, means, yerr=sds, color=colors, capsize=4)
        ax.set_xticks(x, names)
        lo = max(0.0, min(means) - 0.1)
        ax.set_ylim(lo, min(1.0, max(m + s for m, s in zip(means, sds)) + 0.05))
        ax.set_title(title)
        ax.set_ylabel("test Dice (young subjects)")
    fig.suptitle("Transfer learning: mean ± SD over seeds ('none': one run)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_outputs(workdir: Path, summary: Mapping, class_names: Mapping[int, str], tests: Mapping,
                  record: Mapping, notes: Sequence[str]) -> dict:
    paths = {"markdown": workdir / "table.md", "csv": workdir / "table.csv", "json": workdir / "table.json",
             "plot": workdir / "transfer.png"}
    write_text_atomic(paths["markdown"], table_markdown(summary, class_names, tests, notes))
    keys = ["all", "fg", *[str(k) for k in class_names]]
    with atomic_path(paths["csv"], suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "runs", *[f"{'dice_' + (class_names[int(k)] if k.isdigit() else k)}_{s}"
                                          for k in keys for s in ("mean", "sd")]])
        for strategy, s in summary.items():
            w.writerow([strategy, s["n_runs"], *[f"{s[m][k]:.6f}" for k in keys for m in ("mean", "sd")]])
    tests_json = {what: {f"{a} vs {b}": p for (a, b), p in t.items()} for what, t in tests.items()}
    spread = {what: {f"{a} vs {b}": c for (a, b), c in spread_pairs(summary, what).items()} for what in ("all", "fg")}
    write_text_atomic(paths["json"], json.dumps({**record, "summary": summary, "bonferroni_p": tests_json,
                                                 "test": "paired t over test cases, seed means",
                                                 "seed_spread": spread},
                                                indent=1, default=str) + "\n")
    _plot(paths["plot"], summary)
    return paths


# ---------------------------------------------------------------------------------------- the study


def _run_cases(run_dir: Path, which: str, eval_images: Path, refs: Mapping[str, Path], labels: Sequence[int],
               progress: bool) -> dict:
    from jaxseg.inference.runs import predict_with_runs

    pred_dir = run_dir / "predictions"
    predict_with_runs([run_dir], eval_images, pred_dir, which=which, progress=progress, skip_existing=True)
    return score_cases(pred_dir, refs, labels)


def _notes(cfg: NeonatalConfig, roles: Mapping, seeds: Sequence[int], n_pairs: int, total_s: float) -> list[str]:
    tc = cfg.transfer
    return [f"Synthetic tissue cohort at {cfg.synth.spacing:g} mm: pre-trained on the {tc.n_old} oldest subjects "
             f"({len(roles['old_train'])} train / {len(roles['old_val'])} validation, "
             f"{cfg.train.epochs * cfg.train.steps_per_epoch} steps, lr {cfg.optim.lr:g}); each strategy "
             f"{tc.finetune_steps} steps on {len(roles['finetune'])} of the {tc.n_young} youngest "
             f"(fine-tuning lr {tc.finetune_lr:g}, from scratch lr {tc.scratch_lr or cfg.optim.lr:g}); test: the other "
             f"{len(roles['test'])}. Batch {cfg.data.batch_size}, {cfg.optim.kind}, "
             f"{'x'.join(map(str, cfg.data.patch_size))} patches.",
             f"Mean ± SD over {len(seeds)} seeds of each run's mean test Dice ('none' = the pre-trained model, one "
             f"run, SD 0). Paired t-tests over the {len(roles['test'])} test cases on each case's Dice averaged over a "
             f"strategy's seeds (a case counts once); Bonferroni factor: {n_pairs} pairs.",
             "Paper (dHCP): deeper fine-tuning beat shallower; shallow was clearly worst; fine-tuned models beat the "
             "model trained from scratch on 40 preterm subjects overall (scratch won on the cerebellum, the "
             "untuned model on WM); more trainable parameters gave more variability.",
             f"Total {total_s / 60:.1f} min for this invocation "
             "(a rerun skips the stages already complete)."]


def run_transfer_study(cfg: NeonatalConfig, workdir: str | os.PathLike, *, progress: bool = True,
                       log: Callable[[str], None] = print) -> dict:
    from jaxseg.data.datasets import read_dataset
    from jaxseg.train.loop import train_and_evaluate

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, workdir / "config.yaml")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    tc = cfg.transfer
    seeds = list(cfg.seeds) if cfg.seeds is not None else [cfg.seed]
    cfg = tissue_cohort(cfg, workdir, progress=progress, timings=timings)
    dataset = read_dataset(Path(cfg.data.dataset))
    labels = {str(k): int(v) for k, v in dataset.labels.items()}
    class_names = {v: k for k, v in labels.items()}
    records = {c.case_id: c for c in dataset.cases if c.split != "test"}
    ages = {c: float(r.age) for c, r in records.items() if r.age is not None}
    corr = write_age_effect(workdir, dataset.cases, labels)
    roles = assign_roles(ages, tc, cfg.data.split_seed)
    write_text_atomic(workdir / "roles.json", json.dumps(
        {**roles, "ages": {c: ages[c] for r in roles.values() for c in r}}, indent=1) + "\n")
    refs = {c: records[c].label for c in roles["test"]}
    eval_images = image_folder(workdir / "data" / "test_images", [records[c] for c in roles["test"]])
    span = lambda ids: f"{min(ages[c] for c in ids):.1f}-{max(ages[c] for c in ids):.1f}"  # noqa: E731
    log(f"transfer: pre-train on {len(roles['old_train'])} (+{len(roles['old_val'])} validation) oldest subjects "
        f"({span(roles['old_train'] + roles['old_val'])} weeks); fine-tune on {len(roles['finetune'])} "
        f"({span(roles['finetune'])} weeks), test on {len(roles['test'])} ({span(roles['test'])} weeks) of the "
        f"youngest; seeds {seeds}, {tc.finetune_steps} steps per fine-tuning run")

    # --- Pre-training ---------------------------------------------------------------------------
    pre_dir = workdir / "pretrain"
    t = time.perf_counter()
    pre = train_and_evaluate(pretrain_config(cfg, roles), pre_dir, progress=progress)
    timings["pretrain_s"] = time.perf_counter() - t
    if list(pre["train_cases"]) != roles["old_train"]:
        raise RuntimeError("pre-training used other cases than the study assigned")
    log(f"pre-trained: best validation Dice {pre['best'].get('val_dice'):.3f} at step {pre['best'].get('step')}")

    # --- Strategies -----------------------------------------------------------------------------
    runs: dict[str, list[dict]] = {s: [] for s in tc.strategies}
    for strategy in tc.strategies:
        for seed in (seeds[:1] if strategy == "none" else seeds):
            t = time.perf_counter()
            if strategy == "none":
                run_dir, which = pre_dir, "best"
            else:
                run_dir, which = workdir / strategy / f"seed{seed}", "last"
                out = train_and_evaluate(strategy_config(cfg, strategy, seed, roles, pre_dir), run_dir,
                                         progress=progress)
                if list(out["train_cases"]) != roles["finetune"]:
                    raise RuntimeError(f"{run_dir}: trained on other cases than the study assigned")
            timings[f"train_{strategy}_seed{seed}_s"] = time.perf_counter() - t
            t = time.perf_counter()
            cases = _run_cases(run_dir, which, eval_images, refs, list(labels.values()), progress)
            timings[f"predict_{strategy}_seed{seed}_s"] = time.perf_counter() - t
            runs[strategy].append({"seed": None if strategy == "none" else seed, "run": str(run_dir),
                                   "cases": cases})
            log(f"{strategy} (seed {seed}): test Dice all/fg {np.nanmean([c['all'] for c in cases.values()]):.3f}/"
                f"{np.nanmean([c['fg'] for c in cases.values()]):.3f}")

    summary = summarise(runs, class_names)
    tests = {what: paired_tests(summary, what) for what in ("all", "fg")}
    timings["total_s"] = time.perf_counter() - t_start
    notes = _notes(cfg, roles, seeds, len(tests["all"]), timings["total_s"])
    record = {"roles": roles, "runs": runs, "timings": timings, "age_effect_pearson_r": corr,
              "pretrain_best": pre["best"], "labels": labels}
    paths = write_outputs(workdir, summary, class_names, tests, record, notes)
    return {"summary": summary, "tests": tests, "timings": timings, **{k: str(v) for k, v in paths.items()}}
