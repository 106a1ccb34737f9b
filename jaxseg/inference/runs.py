"""Predict with trained runs: load each run's config and checkpoint, ensemble them by logit averaging."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from jaxseg.config import load_config
from jaxseg.inference.predict import inference_kwargs, make_apply_fn, predict_folder
from jaxseg.models import build_model
from jaxseg.train.checkpoint import load_params


class RunError(ValueError):
    """A --run that is not a run directory, or runs that cannot be ensembled; the message names them."""


def _run_config(run_dir: Path):
    missing = [n for n in ("config.yaml",) if not (run_dir / n).is_file()]
    if not ((run_dir / "best").is_dir() or (run_dir / "ckpt").is_dir()):
        missing.append("parameters: best/ or ckpt/")
    if missing:
        raise RunError(f"{run_dir}: not a run directory (no {' / '.join(missing)})")
    return load_config(run_dir / "config.yaml")


def _signature(cfg) -> dict:
    """What an ensemble's members must share: the logits they average and the input they read."""
    sig = {"data.num_classes": int(cfg.data.num_classes), "data.num_channels": int(cfg.data.num_channels)}
    try:
        kw = inference_kwargs(cfg, None, cfg.data.store)
    except (OSError, ValueError):  # the training store is gone: compare what the config says
        return sig
    from jaxseg.data import store

    labels = store.read_dataset_meta(Path(cfg.data.store)).get("labels")
    if labels is not None:
        sig["labels"] = {str(k): int(v) for k, v in labels.items()}
    sig["target spacing"] = kw["target_spacing"]
    if "channel_names" in kw:
        sig["channel names"] = kw["channel_names"]
    return sig


def check_runs(run_dirs: Sequence[str | os.PathLike]) -> list:
    """The configs of `run_dirs`, after checking that each is a run directory and that an ensemble's
    runs agree on classes, labels, channels and preprocessing (RunError naming both runs otherwise).
    Cheap: no parameters are read."""
    dirs = [Path(r) for r in run_dirs]
    cfgs = [_run_config(d) for d in dirs]
    first = _signature(cfgs[0])
    for d, cfg in zip(dirs[1:], cfgs[1:]):
        sig = _signature(cfg)
        diff = [f"{k} {first[k]} vs {sig[k]}" for k in first if k in sig and first[k] != sig[k]]
        if diff:
            raise RunError(f"--run {dirs[0]} and --run {d} cannot be ensembled: {'; '.join(diff)}")
    return cfgs


def load_run(run_dir: str | os.PathLike, which: str = "best"):
    """(config, model, variables) of a run directory written by `train_and_evaluate`."""
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    params, _ = load_params(run_dir, which)
    return cfg, build_model(cfg), {"params": params}


def predict_with_runs(run_dirs: Sequence[str | os.PathLike], input: str | os.PathLike, out_dir: str | os.PathLike,
                      *, which: str = "best", splits: Sequence[str] | None = None, mirror_tta: bool | None = None,
                      progress: bool = True, **kwargs):
    """Predict `input` (dataset folder, manifest or image folder) with one run or an ensemble of runs
    (folds, checkpoints) sharing one configuration of classes, labels, channels and preprocessing
    (checked first, see `check_runs`). `kwargs` go to `predict_folder` (`skip_existing`, `skip_bad`,
    `save_probabilities`, ...)."""
    check_runs(run_dirs)
    loaded = [load_run(r, which) for r in run_dirs]
    cfg, model, _ = loaded[0]
    kw = inference_kwargs(cfg, model, cfg.data.store)
    if mirror_tta is not None:
        kw["mirror_axes"] = (0, 1, 2) if mirror_tta else ()
    kw.update(kwargs)
    fns = [make_apply_fn(m, v) for _, m, v in loaded]
    return predict_folder(fns, input, out_dir, splits=splits, progress=progress, **kw)
