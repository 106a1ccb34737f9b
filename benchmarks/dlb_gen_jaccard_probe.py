"""Does the paper's generalised Jaccard loss train DLB's generic network on the ablation's cohort?

    python benchmarks/dlb_gen_jaccard_probe.py [--config configs/dlb_ablation_synth.yaml] [--workdir runs/gen_jaccard_probe]

Stage 1 of DLB only (one network on every lesion tile of site0's training cases), 20 epochs x 25 steps,
no augmentation, at the paper's lr 1e-4: the ablation's width (4-...-64) and twice it (8-...-128). Needs the
ablation's store (run `launch dlb-ablation` with the same config first, from the same folder). Writes per
setting the epoch log, the training time and the in-domain test figures to
``benchmarks/results/dlb_ablation_synth/gen_jaccard_probe.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, write_json  # noqa: E402
from jaxseg.config import load_config
from jaxseg.dlb import ablation
from jaxseg.dlb.config import DLBAblationConfig
from jaxseg.dlb.train import predict_dlb, split_cases, train_dlb

SETTINGS = {
    "gj_lr1e-4": ["loss.kind=gen_jaccard", "optim.lr=0.0001"],
    "gj_lr1e-4_f8": ["loss.kind=gen_jaccard", "optim.lr=0.0001", "model.features_base=8", "model.norm_groups=8"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/dlb_ablation_synth.yaml")
    ap.add_argument("--workdir", default="runs/gen_jaccard_probe")
    ap.add_argument("--out", default="benchmarks/results/dlb_ablation_synth/gen_jaccard_probe.json")
    args = ap.parse_args(argv)
    out = {}
    for name, extra in SETTINGS.items():
        cfg = load_config(args.config, schema=DLBAblationConfig, overrides=[
            "seed=0", "seeds=null", "dlb.method=generic", "data.augment=none", "dlb.generic_max_epochs=20",
            "dlb.generic_patience=20", *extra])
        wd = Path(args.workdir) / name
        lines = []
        t = time.perf_counter()
        train_dlb(cfg, wd, log=lambda m: (lines.append(m), print(name, m, flush=True)))
        secs = time.perf_counter() - t
        test = split_cases(cfg.data.store, cfg)["test"]
        rows = []
        for p in predict_dlb(cfg, wd, wd / "pred", test, log=lambda *_: None):
            ref, zooms = ablation._reference(Path(cfg.data.dataset), p["case"])
            rows.append(ablation.case_metrics(np.asarray(nib.load(p["path"]).dataobj), ref, zooms))
        s = ablation.summarise(rows)
        out[name] = {"overrides": extra, "train_s": secs, "epochs": [l for l in lines if "epoch" in l],
                     "in_domain_test": s, "pred_ml": [float(r["pred_ml"]) for r in rows]}
        print(name, "in-domain test Dice", s["dice"], "hybrid", s["hybrid"], flush=True)
    write_json(args.out, {"environment": environment(), "command": " ".join(sys.argv), "settings": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
