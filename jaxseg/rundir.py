"""The run directory: the one contract between training and everything after it (predict, evaluate,
import-torch, train.init_from). nnU-Net's model folder plays the same role.

    RUN/
      config.yaml          the resolved config (`jaxseg.config.save_config`)
      run.json             versions, devices, git revision, seed, the XLA / JAX flags that change numbers
      preprocessing.json   what a new image goes through before the network: orientation, crop rule,
                           intensity normalisation, target spacing, channel names, labels, and the
                           dataset's median spacing (the topology's `data.spacing: null`)
      best/ ckpt/          Orbax checkpoints; inference restores only `state.params` from them

Written by `train` (at its start, from the case store's dataset.json) and by `import-torch`; read by
everything that uses a trained run, which therefore works from any working directory, on a copied run
and after the store is deleted. Imports nothing from `jaxseg.train` or `jaxseg.inference`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from jaxseg import runtime
from jaxseg.fileio import write_json_atomic, write_text_atomic

CONFIG = "config.yaml"
RUN = "run.json"
PREPROCESSING = "preprocessing.json"
PARAM_DIRS = {"best": ("best", "ckpt"), "last": ("ckpt",)}  # `best` falls back to the last checkpoint
PREPROCESSING_KEYS = ("version", "orientation", "crop", "normalization", "target_spacing", "channel_names")


class RunError(ValueError):
    """A --run that is not a usable run directory, or runs that cannot be ensembled; the message names them."""


# ------------------------------------------------------------------------------------------ writing


def run_record(cfg) -> dict:
    """What a run directory needs to be reproduced: versions, devices, git revision, and the XLA / JAX
    settings that change numbers or speed (jaxseg.runtime)."""
    import jax

    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        rev = None
    return {"versions": versions, "git_revision": rev, "python": platform.python_version(),
            "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
            "seed": cfg.seed, "runtime": runtime.record()}


def preprocessing_from_store(store_root: str | os.PathLike) -> dict:
    """preprocessing.json's content for a run trained on the case store `store_root`: its dataset.json's
    preprocessing settings and labels, the median spacing of its stored cases (what `data.spacing: null`
    plans the topology with, as nnU-Net plans on the dataset median) and, for provenance only, where
    the store was and a fingerprint of its content."""
    from jaxseg.data import store

    root = Path(store_root)
    meta = store.read_dataset_meta(root)
    pre = dict(meta.get("preprocessing") or {})
    record = {k: pre.get(k) for k in PREPROCESSING_KEYS}
    if record["target_spacing"] is None and meta.get("spacing") is not None:
        record["target_spacing"] = meta["spacing"]
    if record["channel_names"] is None:
        record["channel_names"] = meta.get("channel_names")
    record["labels"] = meta.get("labels")
    record["median_spacing"] = store.median_spacing(root)
    record["store"] = {"path": str(root.absolute()), "fingerprint": store.content_fingerprint(root),
                       "n_cases": len(store.list_cases(root)), "dataset": meta.get("source")}
    return record


def write_run(workdir: str | os.PathLike, cfg, preprocessing: dict, **extra) -> dict:
    """config.yaml, run.json (plus `extra` entries) and preprocessing.json into `workdir`, each atomically.
    Returns the run record."""
    from jaxseg.config import save_config

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, workdir / CONFIG)
    record = {**run_record(cfg), **extra}
    write_json_atomic(workdir / RUN, record)
    write_json_atomic(workdir / PREPROCESSING, preprocessing)
    return record


# ------------------------------------------------------------------------------------------ reading


def _params_present(run_dir: Path) -> bool:
    return any((run_dir / d).is_dir() for d in PARAM_DIRS["best"])


def check_run(run_dir: str | os.PathLike) -> Path:
    """`run_dir` as a Path after checking that it is a usable run directory (RunError naming it and what
    it lacks otherwise). Cheap: nothing is parsed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    missing = [n for n in (CONFIG,) if not (run_dir / n).is_file()]
    if not _params_present(run_dir):
        missing.append("parameters: best/ or ckpt/")
    if missing:
        raise RunError(f"{run_dir}: not a run directory (no {' / '.join(missing)})")
    if not (run_dir / PREPROCESSING).is_file():
        raise RunError(f"{run_dir}: no {PREPROCESSING} (the preprocessing this run was trained with: target "
                       f"spacing, channels, labels); it was written by an older jaxseg, which read it from the "
                       f"training store instead. Retrain, or write it from that store with `python -c \"from "
                       f"jaxseg import rundir; rundir.add_preprocessing('{run_dir}', 'STORE')\"`")
    return run_dir


def read_config(run_dir: str | os.PathLike):
    from jaxseg.config import load_config

    return load_config(check_run(run_dir) / CONFIG)


def read_preprocessing(run_dir: str | os.PathLike) -> dict:
    path = check_run(run_dir) / PREPROCESSING
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: unreadable ({e})") from None


# Sections older jaxseg wrote into every run's config.yaml; a run's config now holds the ones it uses.
_OLD_METHOD_SECTIONS = ("synth", "transfer", "dlb")


def add_preprocessing(run_dir: str | os.PathLike, store_root: str | os.PathLike) -> Path:
    """Bring a run written before preprocessing.json existed up to date: the file, from the store it was
    trained on, and its config.yaml without the method sections older runs carried (`dlb` stays in a DLB
    run, one with generic/ or ensemble/ stages)."""
    import yaml

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise RunError(f"{run_dir}: not a run directory (no {CONFIG})")
    pre = preprocessing_from_store(store_root)
    data = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
    dlb_run = (run_dir / "generic").is_dir() or (run_dir / "ensemble").is_dir()
    drop = [k for k in _OLD_METHOD_SECTIONS if k in data and not (k == "dlb" and dlb_run)]
    if drop:
        for k in drop:
            data.pop(k)
        write_text_atomic(run_dir / CONFIG, yaml.safe_dump(data, sort_keys=False))
    return write_json_atomic(run_dir / PREPROCESSING, pre)


def model_spacing(cfg, preprocessing: dict | None):
    """The spacing the U-Net topology is planned with: `data.spacing`, else (null) the dataset's median
    spacing from preprocessing.json (nnU-Net plans on the median), else 1 mm isotropic."""
    if cfg.data.spacing is not None:
        return tuple(cfg.data.spacing)
    med = (preprocessing or {}).get("median_spacing")
    return None if med is None else tuple(float(v) for v in med)


def restore_params(directory: str | os.PathLike, step: int | None = None):
    """(params, meta, step) of `step` (default: the latest) in the Orbax checkpoint directory `directory`,
    or None when it holds no checkpoint. Only the parameters and the JSON record are read."""
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(Path(directory).absolute(), item_names=("state", "data", "meta"),
                                options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        step = mgr.latest_step() if step is None else step
        if step is None:
            return None
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                        meta=ocp.args.JsonRestore()))
        return out["state"]["params"], out["meta"], int(step)
    finally:
        mgr.close()


def load_params(run_dir: str | os.PathLike, which: str = "best"):
    """The parameters of a finished or running run: `best` (falls back to the last when the run had no
    validation split) or `last`. Returns (params, meta)."""
    run_dir = Path(run_dir)
    order = PARAM_DIRS[which]
    for sub in order:
        if (run_dir / sub).exists():
            found = restore_params(run_dir / sub)
            if found is not None:
                return found[0], found[1]
    raise FileNotFoundError(f"{run_dir}: no checkpoint in {' or '.join(order)}/ (has this run trained?)")


def load_run(run_dir: str | os.PathLike, which: str = "best"):
    """(config, preprocessing, model, variables) of a run directory."""
    from jaxseg.models import build_model

    run_dir = check_run(run_dir)
    cfg, pre = read_config(run_dir), read_preprocessing(run_dir)
    params, _ = load_params(run_dir, which)
    return cfg, pre, build_model(cfg, model_spacing(cfg, pre)), {"params": params}

