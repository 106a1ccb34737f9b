"""Predict with trained runs: each run directory's config, preprocessing.json and parameters
(:mod:`jaxseg.rundir`, nothing else: not the training store), ensembled by logit averaging."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from jaxseg import rundir
from jaxseg.inference.predict import inference_kwargs, make_apply_fn, predict_folder
from jaxseg.rundir import RunError, load_run

__all__ = ["RunError", "check_runs", "load_run", "predict_with_runs"]


def _signature(cfg, pre: dict) -> dict:
    """What an ensemble's members must share: the logits they average and the input they read."""
    sig = {"data.num_classes": int(cfg.data.num_classes), "data.num_channels": int(cfg.data.num_channels)}
    if pre.get("labels") is not None:
        sig["labels"] = {str(k): int(v) for k, v in pre["labels"].items()}
    sig["target spacing"] = inference_kwargs(cfg, None, pre)["target_spacing"]
    if pre.get("channel_names"):
        sig["channel names"] = list(pre["channel_names"])
    return sig


def check_runs(run_dirs: Sequence[str | os.PathLike]) -> list:
    """The configs of `run_dirs`, after checking that each is a run directory and that an ensemble's
    runs agree on classes, labels, channels and preprocessing (RunError naming both runs otherwise).
    Cheap: no parameters are read."""
    dirs = [Path(r) for r in run_dirs]
    cfgs = [rundir.read_config(d) for d in dirs]
    sigs = [_signature(c, rundir.read_preprocessing(d)) for c, d in zip(cfgs, dirs)]
    first = sigs[0]
    for d, sig in zip(dirs[1:], sigs[1:]):
        diff = [f"{k} {first[k]} vs {sig[k]}" for k in first if k in sig and first[k] != sig[k]]
        if diff:
            raise RunError(f"--run {dirs[0]} and --run {d} cannot be ensembled: {'; '.join(diff)}")
    return cfgs


def predict_with_runs(run_dirs: Sequence[str | os.PathLike], input: str | os.PathLike, out_dir: str | os.PathLike,
                      *, which: str = "best", splits: Sequence[str] | None = None, mirror_tta: bool | None = None,
                      progress: bool = True, **kwargs):
    """Predict `input` (dataset folder, manifest or image folder) with one run or an ensemble of runs
    (folds, checkpoints) sharing one configuration of classes, labels, channels and preprocessing
    (checked first, see `check_runs`). `kwargs` go to `predict_folder` (`skip_existing`, `skip_bad`,
    `save_probabilities`, ...)."""
    check_runs(run_dirs)
    loaded = [load_run(r, which) for r in run_dirs]
    cfg, pre, model, _ = loaded[0]
    kw = inference_kwargs(cfg, model, pre)
    if mirror_tta is not None:
        kw["mirror_axes"] = (0, 1, 2) if mirror_tta else ()
    kw.update(kwargs)
    fns = [make_apply_fn(m, v) for _, _, m, v in loaded]
    return predict_folder(fns, input, out_dir, splits=splits, progress=progress, **kw)
