"""DeepLesionBrain's ablation (paper Tables 2/3) on the MS-like synthetic cohort, cross-site.

`run_ablation(cfg, workdir)`: synth (lesion flavour, several sites) -> prepare (no crop) -> train each
variant on the sites in ``dlb.train_sites`` -> predict -> lesion metrics. The test sets are the held-out
cases of the training site(s) (in-domain, Table 2's role) and every case of the other sites
(cross-site, Table 3's role). Variants, as the paper's rows:

  DLB with HSL and IQDA | DLB with HSL, without IQDA | DLB without HSL, with IQDA |
  generic network with IQDA | generic network without IQDA

The generic networks trained as stage 1 of the two HSL variants are the two generic rows (the same
training, so not trained twice).

Every variant is trained once per seed (``seeds``; the cohort is the same), in ``<workdir>/seed<N>``,
which holds that seed's own ``table.md``, ``table.csv``, ``table.json``, ``cases.csv`` and
``ablation.png``; a rerun skips what is complete. Over the seeds, the workdir gets ``table.md`` /
``table.csv`` / ``table.json`` (each metric of each variant and test set as mean ± SD over seeds; the
hybrid score's difference to the full DLB row, starred beyond the seed spread; and the paper's two-sided
Wilcoxon test on per-image hybrid scores), ``cases.csv`` (every case, variant and seed with its per-image
hybrid score) and ``ablation.png``.

Per-image hybrid score: the ISBI formula on one image's Dice, PPV, LFPR and LTPR, with the Corr of its
test set (a correlation of lesion volumes needs a cohort). The Wilcoxon test pairs the images of a test
set, each image's score first averaged over the seeds, so an image counts once.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from jaxseg.evaluation.plots import save_figure
from jaxseg.data import store
from jaxseg.evaluation import metrics as M
from jaxseg.evaluation.seeds import (case_means, compare_seeds, fmt_diff, fmt_mean_sd, fmt_p, paired_over_cases,
                                    seed_columns)
from jaxseg.fileio import atomic_path, write_text_atomic
from jaxseg.dlb.train import predict_dlb, split_cases, train_dlb
from jaxseg.dlb.config import DLBAblationConfig

METRICS = ("hybrid", "dice", "ppv", "tpr", "lfpr", "ltpr", "corr")
VARIANTS = (  # (row label, run folder, dlb.method, data.augment)
    ("DLB with HSL and IQDA", "hsl_iqda", "hsl", "dlb_iqda"),
    ("DLB with HSL, without IQDA", "hsl_noiqda", "hsl", "none"),
    ("DLB without HSL, with IQDA", "nohsl_iqda", "independent", "dlb_iqda"),
    ("Generic network with IQDA", "hsl_iqda", "generic", "dlb_iqda"),
    ("Generic network without IQDA", "hsl_noiqda", "generic", "none"),
)


def _variant_cfg(cfg: DLBAblationConfig, method: str, augment: str) -> DLBAblationConfig:
    return dataclasses.replace(cfg, dlb=dataclasses.replace(cfg.dlb, method=method),
                               data=dataclasses.replace(cfg.data, augment=augment))


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing, empty_pred: M.EmptyPred = "zero") -> dict:
    p, r = pred > 0, ref > 0
    return {"dice": M.dice(p, r), "ppv": M.ppv(p, r, empty_pred), "tpr": M.tpr(p, r),
            "lfpr": M.lfpr(p, r, empty_pred),
            "ltpr": M.ltpr(p, r), "pred_ml": M.volume_mm3(p, spacing) / 1000, "ref_ml": M.volume_mm3(r, spacing) / 1000}


def summarise(rows: list[dict]) -> dict:
    """Means over cases; Corr over cases' lesion volumes; the ISBI hybrid score from those."""
    out = {k: float(np.nanmean([r[k] for r in rows])) for k in ("dice", "ppv", "tpr", "lfpr", "ltpr")}
    corr = M.volume_correlation([r["pred_ml"] for r in rows], [r["ref_ml"] for r in rows])
    out["corr"] = corr
    out["hybrid"] = M.isbi_score(out["dice"], out["ppv"], out["ltpr"], out["lfpr"], 0.0 if np.isnan(corr) else corr)
    out["n"] = len(rows)
    return out


def image_hybrid(case: dict, corr: float) -> float:
    """The ISBI hybrid score of one image: its Dice, PPV, LFPR and LTPR with `corr`, its test set's
    correlation of lesion volumes (0 when undefined, as `summarise`)."""
    return M.isbi_score(case["dice"], case["ppv"], case["ltpr"], case["lfpr"], 0.0 if np.isnan(corr) else corr)


def _reference(dataset: Path, case: str) -> tuple[np.ndarray, tuple]:
    for sub in ("labelsTs", "labelsTr"):
        p = dataset / sub / f"{case}.nii.gz"
        if p.exists():
            img = nib.load(p)
            return np.asarray(img.dataobj), img.header.get_zooms()[:3]
    raise FileNotFoundError(f"{dataset}: no reference label for {case}")


def run_ablation(cfg: DLBAblationConfig, workdir, *, log=print) -> dict:
    """The ablation (module docstring) once per seed, then the table over seeds."""
    workdir = Path(workdir)
    seeds = list(cfg.seeds) if cfg.seeds is not None else [cfg.seed]
    t_start = time.perf_counter()
    per_seed = {}
    for seed in seeds:
        log(f"=== seed {seed}")
        per_seed[seed] = run_ablation_seed(dataclasses.replace(cfg, seed=seed, seeds=None), workdir / f"seed{seed}",
                                           log=log)
    timings = {"total_s": time.perf_counter() - t_start,
               **{f"seed{k}_s": v["timings"]["total_s"] for k, v in per_seed.items()}}
    table, case_rows = write_over_seeds(workdir, per_seed, timings, cfg.eval.lesion_empty_pred)
    return {"table": table, "cases": case_rows, "timings": timings, "per_seed": per_seed}


def run_ablation_seed(cfg: DLBAblationConfig, workdir, *, log=print) -> dict:
    """One seed of the ablation in `workdir` (``cfg.seed``)."""
    from jaxseg.data.prepare import prepare
    from jaxseg.data.synth import write_cohort

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict = {}
    dataset, store_root = Path(cfg.data.dataset), Path(cfg.data.store)
    s = cfg.synth
    if not (dataset / "dataset.json").exists():
        t0 = time.perf_counter()
        # MS-like lesions on control anatomy only
        write_cohort(dataset, dataclasses.replace(s, flavour="lesion", p_ventriculomegaly=0.0,
                                                  p_cerebellar_hypoplasia=0.0))
        timings["synth_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepare(dataset, store_root, crop=False, progress=False)
    timings["prepare_s"] = time.perf_counter() - t0

    split = split_cases(store_root, cfg)
    train_sites = {str(x) for x in (cfg.dlb.train_sites or ())}
    metas = {c: store.open_case(store_root, c).meta for c in store.list_cases(store_root)}
    groups = {"in-domain": [c for c in split["test"] if str(metas[c].get("site")) in train_sites]}
    for site in sorted({str(m.get("site")) for m in metas.values()} - train_sites):
        groups[f"cross-site {site}"] = sorted(c for c, m in metas.items() if str(m.get("site")) == site)
    log(f"ablation: train on sites {sorted(train_sites)} ({len(split['train'])} train / {len(split['val'])} val); "
        + ", ".join(f"{g}: {len(c)} cases" for g, c in groups.items()))

    case_rows, table = [], []
    trained: dict[str, dict] = {}
    for label, run, method, augment in VARIANTS:
        vcfg = _variant_cfg(cfg, method, augment)
        run_dir = workdir / run
        if method != "generic" and run not in trained:
            t0 = time.perf_counter()
            trained[run] = train_dlb(vcfg, run_dir, log=log)
            timings[f"train_{run}_s"] = time.perf_counter() - t0
        tag = run if method != "generic" else f"generic_{augment}"
        cases = sorted({c for cs in groups.values() for c in cs})
        t0 = time.perf_counter()
        preds = predict_dlb(vcfg, run_dir, workdir / "predictions" / tag, cases, log=lambda *_: None)
        timings[f"predict_{tag}_s"] = time.perf_counter() - t0
        by_case = {}
        for p in preds:
            ref, zooms = _reference(dataset, p["case"])
            pred = np.asarray(nib.load(p["path"]).dataobj)
            by_case[p["case"]] = {"variant": label, "case": p["case"], "site": p["site"],
                                  "seconds": p["seconds"],
                                  **case_metrics(pred, ref, zooms, cfg.eval.lesion_empty_pred)}
        case_rows.extend(by_case.values())
        for g, cs in groups.items():
            if cs:
                row = {"variant": label, "test": g, **summarise([by_case[c] for c in cs])}
                table.append(row)
                for c in cs:  # the per-image hybrid score takes its test set's Corr
                    by_case[c]["test"] = g
                    by_case[c]["hybrid_image"] = image_hybrid(by_case[c], row["corr"])
        log(f"{label}: " + "; ".join(f"{r['test']} hybrid {r['hybrid']:.3f} Dice {r['dice']:.3f}"
                                     for r in table if r["variant"] == label))
    timings["total_s"] = time.perf_counter() - t_start
    _write(workdir, table, case_rows, timings, trained, cfg.eval.lesion_empty_pred)
    return {"table": table, "cases": case_rows, "timings": timings}


def _fmt(v) -> str:
    return "nan" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def _write(workdir: Path, table: list[dict], case_rows: list[dict], timings: dict, trained: dict,
           empty_pred: M.EmptyPred = "zero") -> None:
    lines = ["| Method | Test set | n | Hybrid score | Dice | PPV | TPR | LFPR | LTPR | Corr |",
             "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['variant']} | {r['test']} | {r['n']} | " + " | ".join(
            _fmt(r[k]) for k in ("hybrid", "dice", "ppv", "tpr", "lfpr", "ltpr", "corr")) + " |")
    lines += ["", f"Empty predictions: {M.EMPTY_PRED_NOTES[empty_pred]} (`eval.lesion_empty_pred: {empty_pred}`)."]
    write_text_atomic(workdir / "table.md", "\n".join(lines) + "\n")
    for name, rows, fields in (("table.csv", table, ["variant", "test", "n", *METRICS]),
                               ("cases.csv", case_rows, list(case_rows[0]))):
        with atomic_path(workdir / name, suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    write_text_atomic(workdir / "table.json", json.dumps({"table": table, "empty_pred": empty_pred, "timings": timings,
                                                          "training": trained}, indent=1, default=str))
    _plot(workdir / "ablation.png", table, case_rows)


def _plot(path: Path, table: list[dict], case_rows: list[dict], *, score: str = "hybrid", spread: str | None = None,
          ylabel: str = "ISBI hybrid score", per_case: tuple[str, str, str] = (
              "dice", "per-case Dice (all test cases)", "Per-case lesion Dice")) -> None:
    """Bars of `score` per variant and test set (error bars from `spread`), and a box plot of the cases'
    ``per_case[0]`` per variant (``per_case``: key, y label, title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in table))
    tests = list(dict.fromkeys(r["test"] for r in table))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(tests)
    for j, t in enumerate(tests):
        sel = [next((r for r in table if r["variant"] == v and r["test"] == t), None) for v in variants]
        axes[0].bar(np.arange(len(variants)) + j * width, [r[score] if r else np.nan for r in sel], width,
                    yerr=[r[spread] if r else 0 for r in sel] if spread else None, capsize=3, label=t)
    names = [textwrap.fill(v, 16) for v in variants]
    axes[0].set_xticks(np.arange(len(variants)) + 0.4 - width / 2, names, fontsize=7)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    axes[0].set_title("Hybrid score per variant and test set")
    key, case_label, case_title = per_case
    axes[1].boxplot([[r[key] for r in case_rows if r["variant"] == v] for v in variants])
    axes[1].set_xticks(range(1, len(variants) + 1), names, fontsize=7)
    axes[1].set_ylabel(case_label)
    axes[1].set_title(case_title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- over seeds

REFERENCE_VARIANT = VARIANTS[0][0]  # the full method: DLB with HSL and IQDA


def over_seeds(per_seed: dict) -> tuple[list[dict], list[dict]]:
    """Rows over seeds from `per_seed` (seed -> {"table", "cases"} of `run_ablation_seed`): per variant and
    test set, each metric's per-seed values with mean and SD; ``vs_ref_hybrid``: the difference of the
    hybrid means to `REFERENCE_VARIANT` (`compare_seeds`, B = this variant); ``wilcoxon_p``: the two-sided
    Wilcoxon signed-rank test against it over the test set's images, each image's hybrid score averaged
    over the seeds. Returns (rows, the case rows of every seed with their ``seed``)."""
    seeds = list(per_seed)
    keys = list(dict.fromkeys((r["variant"], r["test"]) for sd in seeds for r in per_seed[sd]["table"]))
    cell = {(sd, r["variant"], r["test"]): r for sd in seeds for r in per_seed[sd]["table"]}
    cases = [{"seed": sd, **c} for sd in seeds for c in per_seed[sd]["cases"]]

    def image_means(variant, test):
        return case_means([{c["case"]: c["hybrid_image"] for c in cases
                            if c["seed"] == sd and c["variant"] == variant and c["test"] == test} for sd in seeds])

    rows = []
    for variant, test in keys:
        row = {"variant": variant, "test": test, "n": cell[(seeds[0], variant, test)]["n"], "seeds": seeds,
               **seed_columns([cell[(sd, variant, test)] for sd in seeds], METRICS)}
        if variant != REFERENCE_VARIANT and (seeds[0], REFERENCE_VARIANT, test) in cell:
            row["vs_ref_hybrid"] = compare_seeds([cell[(sd, REFERENCE_VARIANT, test)]["hybrid"] for sd in seeds],
                                                 row["hybrid"])
            mine, ref = image_means(variant, test), image_means(REFERENCE_VARIANT, test)
            row["wilcoxon_p"] = paired_over_cases(ref, mine, "wilcoxon")
            row["image_hybrid_diff"] = float(np.mean([mine[c] - ref[c] for c in ref]))
        rows.append(row)
    return rows, cases


def write_over_seeds(workdir: Path, per_seed: dict, timings: dict, empty_pred: M.EmptyPred = "zero"):
    """``table.md``, ``table.csv``, ``table.json``, ``cases.csv`` and ``ablation.png`` over the seeds."""
    rows, cases = over_seeds(per_seed)
    seeds = list(per_seed)
    lines = [f"Mean ± SD over {len(seeds)} seeds {seeds} of each seed's test-set figures. Δ hybrid: this row's "
             f"mean minus {REFERENCE_VARIANT!r}'s, * beyond the seed spread (SD + SD). Wilcoxon: two-sided "
             "signed-rank test against that row over the test set's images (per-image hybrid score, each image "
             "averaged over the seeds), as the paper's.", "",
             "| Method | Test set | n | Hybrid score | Δ hybrid | Wilcoxon p | Dice | PPV | TPR | LFPR | LTPR | Corr |",
             "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (list(dict.fromkeys(x["test"] for x in rows)).index(r["test"]))):
        d = fmt_diff(r["vs_ref_hybrid"]) if "vs_ref_hybrid" in r else "-"
        p = fmt_p(r["wilcoxon_p"], 3) if "wilcoxon_p" in r else "-"
        lines.append(f"| {r['variant']} | {r['test']} | {r['n']} | {fmt_mean_sd(r['hybrid'])} | {d} | {p} | " +
                     " | ".join(fmt_mean_sd(r[k]) for k in ("dice", "ppv", "tpr", "lfpr", "ltpr", "corr")) + " |")
    lines += ["", f"Empty predictions: {M.EMPTY_PRED_NOTES[empty_pred]} (`eval.lesion_empty_pred: {empty_pred}`).",
              f"Total {timings['total_s'] / 60:.1f} min for this invocation (a rerun skips the stages already complete)."]
    write_text_atomic(workdir / "table.md", "\n".join(lines) + "\n")
    fields = ["variant", "test", "n", *[f"{k}_{s}" for k in METRICS for s in ("mean", "sd")], "wilcoxon_p"]
    with atomic_path(workdir / "table.csv", suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    case_fields = list(dict.fromkeys(k for c in cases for k in c))
    with atomic_path(workdir / "cases.csv", suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=case_fields)
        w.writeheader()
        w.writerows(cases)
    write_text_atomic(workdir / "table.json", json.dumps({"rows": rows, "seeds": seeds, "empty_pred": empty_pred,
                                                          "reference": REFERENCE_VARIANT, "timings": timings},
                                                         indent=1, default=str) + "\n")
    _plot(workdir / "ablation.png", rows, cases, score="hybrid_mean", spread="hybrid_sd",
          ylabel="ISBI hybrid score (mean ± SD over seeds)",
          per_case=("hybrid_image", "per-image hybrid score (every test image and seed)", "Per-image hybrid scores"))
    return rows, cases
