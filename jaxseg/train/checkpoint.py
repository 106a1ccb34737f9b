"""Orbax checkpoints: train state, the grain iterator (with the sampler's DRO table and RNG position),
and a small JSON record (step, config, fingerprint, best metric).

`ckpt/` keeps the last `train.keep_checkpoints`; `best/` keeps the best validation checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
import yaml

from jaxseg.config import (
    Config,
    config_fingerprint,
    diff_configs,
    dump_config,
    load_config,
)
from jaxseg.rundir import load_params, restore_params

__all__ = [
    "TRAJECTORY_KEYS",
    "IncompatibleResume",
    "check_compatible",
    "fingerprint",
    "load_init_params",
    "load_params",
    "manager",
    "meta_record",
    "read_meta",
    "restore",
    "save",
]

# What changes the training trajectory; the rest (logging, checkpoint cadence, evaluation) may differ
# between a run and its resumption. Of `data`, not where the store is (its content is compared by
# fingerprint, see check_compatible) nor the loader's threads and prefetch depth: batches do not depend
# on them.
TRAJECTORY_KEYS = ("seed", "data", "model", "loss", "optim", "dro", "train.epochs", "train.steps_per_epoch",
                   "train.parallel", "train.finetune", "train.init_from")
DATA_KEYS_OFF_TRAJECTORY = ("dataset", "store", "threads", "prefetch")


def _expand(cfg: Config, keys) -> list[str]:
    """`keys` with the section "data" spelled out as its fields, less DATA_KEYS_OFF_TRAJECTORY."""
    out = []
    for k in keys:
        if k == "data":
            out += [f"data.{f.name}" for f in dataclasses.fields(cfg.data) if f.name not in DATA_KEYS_OFF_TRAJECTORY]
        else:
            out.append(k)
    return out


class IncompatibleResume(RuntimeError):
    pass


def fingerprint(cfg: Config, keys: tuple[str, ...] = TRAJECTORY_KEYS) -> str:
    return config_fingerprint(cfg, _expand(cfg, keys))


def manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        item_names=("state", "data", "meta"),
    )


def save(mgr: ocp.CheckpointManager, step: int, state, iterator, meta: dict) -> None:
    """`iterator`: the grain iterator, or None for a trainer whose sampler state is JSON in `meta`
    (DeepLesionBrain's stages)."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(iterator)
    mgr.save(step, args=ocp.args.Composite(**items))
    mgr.wait_until_finished()


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
    return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


# Fields added after runs were saved whose default is not what those runs did: (section, key) -> old value.
# data.oversample: before the key existed every patch was forced with probability p ("random").
_LEGACY_VALUES = {("data", "oversample"): "random"}


def _with_legacy_values(saved: Config, text: str) -> Config:
    raw = yaml.safe_load(text) or {}
    for (section, key), value in _LEGACY_VALUES.items():
        if key not in (raw.get(section) or {}):
            saved = dataclasses.replace(saved, **{section: dataclasses.replace(getattr(saved, section),
                                                                                **{key: value})})
    return saved


def check_compatible(meta: dict, cfg: Config, where: Path, keys: tuple[str, ...] = TRAJECTORY_KEYS, *,
                     store_fingerprint: str | None = None) -> None:
    """Refuse to resume a run whose trajectory-defining config (`keys`) differs, or whose case store now
    holds other content (`store_fingerprint`, see jaxseg.data.store.content_fingerprint), saying what
    differs."""
    saved_store = meta.get("store_fingerprint")
    if store_fingerprint is not None and saved_store is not None and saved_store != store_fingerprint:
        raise IncompatibleResume(
            f"{where}: refusing to resume: the case store {cfg.data.store} holds other cases or preprocessing "
            f"than the one this run trained on (content fingerprint {saved_store[:12]} -> "
            f"{store_fingerprint[:12]}). Use a new --workdir, or point data.store at the original store.")
    if meta.get("fingerprint") == fingerprint(cfg, keys):
        return
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(meta["config"])
    try:
        saved = load_config(f.name, schema=type(cfg), ignore_sections=True)  # older runs held method sections
    finally:
        Path(f.name).unlink(missing_ok=True)
    saved = _with_legacy_values(saved, meta["config"])
    if fingerprint(saved, keys) == fingerprint(cfg, keys):
        return  # written before a config field (with its default value here) was added to the schema
    def matters(line: str) -> bool:
        key = line.split(":")[0]
        return any(key == k or key.startswith(k + ".") for k in _expand(cfg, keys))

    diffs = [d for d in diff_configs(saved, cfg) if matters(d)]
    raise IncompatibleResume(
        f"{where}: refusing to resume: the checkpoint was written with a different config "
        f"(saved -> now): {'; '.join(diffs) or 'fingerprint differs'}. Use a new --workdir, or restore "
        f"the saved values (the saved config is {where / 'config.yaml'}).")


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state, iterator):
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    out = mgr.restore(step, args=ocp.args.Composite(**items))
    return out["state"], out["meta"]


def meta_record(cfg: Config, step: int, keys: tuple[str, ...] = TRAJECTORY_KEYS, **extra) -> dict:
    return {"step": int(step), "fingerprint": fingerprint(cfg, keys), "config": dump_config(cfg),
            "process_count": jax.process_count(), **extra}


def load_init_params(path: str | Path):
    """The parameters `train.init_from` names: a run directory (its `best/` checkpoint, else the last
    in `ckpt/`), a checkpoint directory (`RUN/ckpt` or `RUN/best`: its latest step) or one step's
    directory (`RUN/ckpt/12`). Returns (params, meta, where) with `where` the step directory used.
    A missing path or one without a checkpoint raises FileNotFoundError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"train.init_from: {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(
            f"train.init_from: {path} is a file; expected a run directory, a checkpoint directory "
            f"(RUN/ckpt, RUN/best) or one step's directory (RUN/ckpt/12)")
    if (path / "best").is_dir() or (path / "ckpt").is_dir():
        candidates = [(path / sub, None) for sub in ("best", "ckpt") if (path / sub).is_dir()]
    elif path.name.isdigit() and (path / "state").is_dir():
        candidates = [(path.parent, int(path.name))]
    else:
        candidates = [(path, None)]
    for directory, step in candidates:
        found = restore_params(directory, step)
        if found is not None:
            params, meta, step = found
            return params, meta, directory / str(step)
    raise FileNotFoundError(
        f"train.init_from: no checkpoint in {path} (expected a run directory with best/ or ckpt/, a "
        f"checkpoint directory such as RUN/ckpt, or one step's directory such as RUN/ckpt/12)")
