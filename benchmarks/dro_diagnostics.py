"""What a DRO run trained on, from run directories' metrics.jsonl (issue: DRO breaking a structure).

    python benchmarks/dro_diagnostics.py --run ERM=runs/x/erm --run DRO=runs/x/dro \
        --out benchmarks/results/demo_dro

Writes, under --out: val_dice_class.png (validation Dice per class over steps, one line per run),
sampling.png (per run: drawn share and sampler mass per stratum, the sampler's ESS),
ess.png (ESS over steps, every DRO run on one axis) and summary.json (per run: the last validation
Dice per class, the ESS quantiles over the logged steps, the share of logged steps where the sampler had
collapsed onto about one case (ESS < 1.5), and the command).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from jaxseg.evaluation import plots as P


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no metrics.jsonl (not a training run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(records: list[dict]) -> dict:
    vals = [r for r in records if "val_dice" in r]
    ess = np.asarray([r["dro_ess"] for r in records if r.get("dro_ess") is not None], dtype=np.float64)
    out = {"last_val_step": vals[-1]["step"] if vals else None,
           "val_dice": vals[-1]["val_dice"] if vals else None,
           "val_dice_class": vals[-1].get("val_dice_class") if vals else None}
    if ess.size:
        out["ess_quantiles_10_50_90"] = [float(np.quantile(ess, q)) for q in (0.1, 0.5, 0.9)]
        out["share_of_logs_collapsed_ess_below_1.5"] = float(np.mean(ess < 1.5))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    runs = {}
    for item in args.run:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--run {item!r}: expected NAME=DIR")
        runs[name] = _records(Path(path))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    P.keyed_curves(runs, "val_dice_class", out / "val_dice_class.png", ylabel="validation Dice", ylim=(0, 1))
    P.sampling_shares(runs, out / "sampling.png")
    dro = {n: [(r["step"], r["dro_ess"]) for r in recs if r.get("dro_ess") is not None] for n, recs in runs.items()}
    dro = {n: v for n, v in dro.items() if v}
    if dro:
        fig = Figure(figsize=(6.5, 3.4))
        ax = fig.add_subplot(1, 1, 1)
        for k, (n, pts) in enumerate(dro.items()):
            x, y = zip(*pts)
            ax.plot(x, y, "-o", ms=3, color=P.COLORS[k % len(P.COLORS)], label=n)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("ESS of the hardness sampler (cases)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        P.save_figure(fig, out / "ess.png")
    summary = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "runs": {n: summarize(recs) for n, recs in runs.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["runs"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
