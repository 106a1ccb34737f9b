"""Where a run's errors are: confusion matrix and per-case Dice on its validation cases.

    python benchmarks/val_confusion.py --run runs/demo/erm/seed0 [--which last] [--metadata raw/metadata.csv]

Predicts the run's validation cases (its fold of the store named in its config, as the training loop does)
with the sliding window, prints the confusion matrix (rows: reference class, columns: prediction, as a
fraction of the reference voxels), the pooled Dice per class and, per case, each class's Dice (with the
case's age and site from --metadata, e.g. the synthetic cohort's metadata.csv).
"""

from __future__ import annotations

import argparse
import csv
import sys

import numpy as np

from jaxseg import rundir
from jaxseg.data import store
from jaxseg.data.splits import kfold_split
from jaxseg.inference.predict import make_apply_fn
from jaxseg.inference.sliding_window import sliding_window_logits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--which", default="last", choices=("best", "last"))
    ap.add_argument("--metadata", default=None)
    args = ap.parse_args(argv)
    cfg, _, model, variables = rundir.load_run(args.run, args.which)
    fn = make_apply_fn(model, variables)
    root = cfg.data.store
    ids = sorted(c for c in store.list_cases(root) if store.read_case_meta(root, c).get("split", "train") != "test")
    _, val = kfold_split(ids, cfg.data.fold, cfg.data.num_folds, cfg.data.split_seed)
    meta = {r["case"]: r for r in csv.DictReader(open(args.metadata))} if args.metadata else {}
    k = cfg.data.num_classes
    conf = np.zeros((k, k), np.int64)
    for cid in val:
        case = store.open_case(root, cid)
        image, label = case.read_image(), case.read_label()
        logits, _ = sliding_window_logits(fn, image, cfg.data.patch_size, k, step=cfg.eval.step_size,
                                          sigma_scale=cfg.eval.gaussian_sigma, window_batch=cfg.eval.window_batch)
        pred = np.argmax(logits, -1)
        conf += np.bincount(label.ravel().astype(np.int64) * k + pred.ravel(), minlength=k * k).reshape(k, k)
        dice = [2 * ((pred == c) & (label == c)).sum() / max((pred == c).sum() + (label == c).sum(), 1)
                for c in range(1, k)]
        m = meta.get(cid, {})
        print(cid, m.get("stratum", ""), m.get("age", ""), m.get("site", ""), " ".join(f"{d:.2f}" for d in dice))
    np.set_printoptions(linewidth=200)
    print("confusion (rows: reference, columns: prediction; fraction of the reference voxels)")
    print(np.round(conf / np.maximum(conf.sum(1, keepdims=True), 1), 3))
    print("pooled Dice per class", np.round(2 * np.diag(conf) / (conf.sum(0) + conf.sum(1)), 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
