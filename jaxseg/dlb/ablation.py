"""DeepLesionBrain's ablation (paper Tables 2/3) on the MS-like synthetic cohort, cross-site.

`run_ablation(cfg, workdir)`: synth (lesion flavour, several sites) -> prepare (no crop) -> train each
variant on the sites in ``dlb.train_sites`` -> predict -> lesion metrics. The test sets are the held-out
cases of the training site(s) (in-domain, Table 2's role) and every case of the other sites
(cross-site, Table 3's role). Variants, as the paper's rows:

  DLB with HSL and IQDA | DLB with HSL, without IQDA | DLB without HSL, with IQDA |
  generic network with IQDA | generic network without IQDA

The generic networks trained as stage 1 of the two HSL variants are the two generic rows (the same
training, so not trained twice). Writes ``table.md``, ``table.csv``, ``table.json``, ``cases.csv`` and
``ablation.png`` into the workdir.
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


def _reference(dataset: Path, case: str) -> tuple[np.ndarray, tuple]:
    for sub in ("labelsTs", "labelsTr"):
        p = dataset / sub / f"{case}.nii.gz"
        if p.exists():
            img = nib.load(p)
            return np.asarray(img.dataobj), img.header.get_zooms()[:3]
    raise FileNotFoundError(f"{dataset}: no reference label for {case}")


def run_ablation(cfg: DLBAblationConfig, workdir, *, log=print) -> dict:
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
                table.append({"variant": label, "test": g, **summarise([by_case[c] for c in cs])})
        log(f"{label}: " + "; ".join(f"{r['test']} hybrid {r['hybrid']:.3f} Dice {r['dice']:.3f}"
                                     for r in table if r["variant"] == label))
    timings["total_s"] = time.perf_counter() - t_start
    _write(workdir, table, case_rows, timings, trained, cfg.eval.lesion_empty_pred)
    return {"table": table, "timings": timings}


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


def _plot(path: Path, table: list[dict], case_rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in table))
    tests = list(dict.fromkeys(r["test"] for r in table))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(tests)
    for j, t in enumerate(tests):
        vals = [next((r["hybrid"] for r in table if r["variant"] == v and r["test"] == t), np.nan) for v in variants]
        axes[0].bar(np.arange(len(variants)) + j * width, vals, width, label=t)
    names = [textwrap.fill(v, 16) for v in variants]
    axes[0].set_xticks(np.arange(len(variants)) + 0.4 - width / 2, names, fontsize=7)
    axes[0].set_ylabel("ISBI hybrid score")
    axes[0].legend(fontsize=8)
    axes[0].set_title("Hybrid score per variant and test set")
    data = [[r["dice"] for r in case_rows if r["variant"] == v] for v in variants]
    axes[1].boxplot(data)
    axes[1].set_xticks(range(1, len(variants) + 1), names, fontsize=7)
    axes[1].set_ylabel("per-case Dice (all test cases)")
    axes[1].set_title("Per-case lesion Dice")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
