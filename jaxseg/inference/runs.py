"""Predict with trained runs: load each run's config and checkpoint, ensemble them by logit averaging."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from jaxseg.config import load_config
from jaxseg.inference.predict import inference_kwargs, make_apply_fn, predict_folder
from jaxseg.models import build_model
from jaxseg.train.checkpoint import load_params


def load_run(run_dir: str | os.PathLike, which: str = "best"):
    """(config, model, variables) of a run directory written by `train_and_evaluate`."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    params, _ = load_params(run_dir, which)
    return cfg, build_model(cfg), {"params": params}


def predict_with_runs(run_dirs: Sequence[str | os.PathLike], input: str | os.PathLike, out_dir: str | os.PathLike,
                      *, which: str = "best", splits: Sequence[str] | None = None, mirror_tta: bool | None = None,
                      progress: bool = True, **kwargs):
    """Predict `input` (dataset folder, manifest or image folder) with one run or an ensemble of runs
    (folds, checkpoints) sharing one configuration of patch size, classes and preprocessing."""
    loaded = [load_run(r, which) for r in run_dirs]
    cfg, model, _ = loaded[0]
    kw = inference_kwargs(cfg, model, cfg.data.store)
    if mirror_tta is not None:
        kw["mirror_axes"] = (0, 1, 2) if mirror_tta else ()
    kw.update(kwargs)
    fns = [make_apply_fn(m, v) for _, m, v in loaded]
    return predict_folder(fns, input, out_dir, splits=splits, progress=progress, **kw)
