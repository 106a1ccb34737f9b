"""`train_and_evaluate(cfg, workdir)`: the training loop, read top to bottom.

Sections, each a function below `_train_and_evaluate` in the order it calls them (big_vision's
train.py): run directory -> mesh -> input -> model and sharded init (eval_shape) -> step (jit or pmap,
jaxseg.train.parallel; the state donated) -> checkpoint/resume -> loop (batch, step, DRO table,
non-finite guard, logs, checkpoints, validation) -> summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxseg import distributed, locks, rundir
from jaxseg.config import Config, restrict
from jaxseg.data import store
from jaxseg.data.augment import PRESETS, AugmentParams, for_patch
from jaxseg.data.budget import slice_mask
from jaxseg.data.pipeline import CaseSampler, CaseSource, PatchBatchIterator
from jaxseg.data.splits import kfold_split, limit_cases, select_cases  # noqa: F401 (re-exported)
from jaxseg.fileio import write_json_atomic, write_text_atomic
from jaxseg.inference.predict import make_apply_fn
from jaxseg.inference.sliding_window import sliding_window_logits
from jaxseg.losses import dro as dro_math
from jaxseg.models import build_model, model_topology
from jaxseg.train import checkpoint as ckpt
from jaxseg.train import finetune
from jaxseg.train.optim import make_optimizer
from jaxseg.train.parallel import Runner, make_runner
from jaxseg.train.step import init_state

log = logging.getLogger("jaxseg.train")


class TrainingError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ helpers


class MetricLog:
    """JSONL + TensorBoard, written by process 0 only."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        self._jsonl = open(workdir / "metrics.jsonl", "a") if enabled else None
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, **values) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
                 for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        for k, v in clean.items():
            if isinstance(v, float) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
            elif isinstance(v, dict):  # one curve per entry, e.g. a per-stratum share
                for sub, x in v.items():
                    if isinstance(x, float) and math.isfinite(x):
                        self._tb.add_scalar(f"{k}/{sub}", x, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _class_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> dict[int, float]:
    """Dice of each foreground class present in the prediction or the reference."""
    scores = {}
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        if p.any() or r.any():
            scores[c] = float(2.0 * np.logical_and(p, r).sum() / (p.sum() + r.sum()))
    return scores


def class_names(store_root, num_classes: int) -> list[str]:
    """Name of each class index (the store's dataset labels; ``class_<i>`` where it names none)."""
    names = [f"class_{c}" for c in range(num_classes)]
    for k, v in store.read_dataset_meta(store_root).get("labels", {}).items():
        if 0 <= int(v) < num_classes:
            names[int(v)] = k
    return names


def validate(apply_fn, store_root, case_ids, cfg: Config, patch_size, progress: bool = False) -> dict:
    """Full-volume sliding-window Dice on stored (preprocessed) validation cases: ``val_dice`` (mean over
    cases of the mean foreground Dice) and ``val_dice_class`` (per class name, mean over the cases where
    the class is present in the prediction or the reference); with an age head (`apply_fn` returns
    (logits, age)) also the absolute error of the mean window age."""
    from tqdm import tqdm

    names = class_names(store_root, cfg.data.num_classes)
    dices, per_class, age_errors = [], {}, []
    for cid in tqdm(case_ids, desc="validation", unit="case", leave=False, disable=not progress,
                    dynamic_ncols=True):
        case = store.open_case(store_root, cid)
        image, label = case.read_image(), case.read_label()
        logits, extra = sliding_window_logits(apply_fn, image, patch_size, cfg.data.num_classes,
                                              step=cfg.eval.step_size, sigma_scale=cfg.eval.gaussian_sigma,
                                              window_batch=cfg.eval.window_batch)
        scores = _class_dice(np.argmax(logits, -1), label, cfg.data.num_classes)
        dices.append(float(np.mean(list(scores.values()))) if scores else float("nan"))
        for c, d in scores.items():
            per_class.setdefault(names[c], []).append(d)
        if extra.get("age") is not None and case.meta.get("age") is not None:
            age_errors.append(abs(float(extra["age"]) - float(case.meta["age"])))
    out = {"val_dice": float(np.nanmean(dices)) if dices else float("nan"), "val_cases": len(dices),
           "val_dice_class": {k: float(np.mean(v)) for k, v in per_class.items()}}
    if age_errors:
        out["val_age_mae"] = float(np.mean(age_errors))
    return out


def case_ages(source: CaseSource, store_root) -> np.ndarray:
    """(n,) float32 ages of `source`'s cases for the AgeU-Net target; a case without one is an error."""
    ages = []
    for cid, meta in zip(source.case_ids, source.metas):
        age = meta.get("age")
        if age is None or not math.isfinite(float(age)):
            raise TrainingError(f"{store_root}: case {cid!r} has no age (model.age_head needs one per training "
                                f"case: an 'age' column in the dataset's metadata, then prepare again)")
        ages.append(float(age))
    return np.asarray(ages, np.float32)


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the lines of `path` (metrics.jsonl) logged after `step`: a resumed run replays those steps
    and logs them again. Returns how many lines were dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            after = int(json.loads(line)["step"]) > step
        except (ValueError, KeyError, TypeError):  # a torn last line of a killed run
            after = True
        dropped += after
        if not after:
            keep.append(line)
    if dropped:
        write_text_atomic(path, "".join(keep))
    return dropped


def _shape(x) -> tuple:
    return tuple(int(v) for v in np.shape(x))


def match_params(loaded, abstract_params, source) -> dict:
    """`loaded` (a restored parameter tree) in the structure of the model's `abstract_params`, as host
    arrays of the model's dtypes. A missing or extra key, or a different shape, is a TrainingError
    naming `source`, the first differing key and (for shapes) both shapes."""
    flat_model, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    flat_loaded = dict((jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_flatten_with_path(loaded)[0])
    model_keys = [jax.tree_util.keystr(k) for k, _ in flat_model]
    where = f"train.init_from={source}: the checkpoint's parameters do not fit this model"
    for key, (_, spec) in zip(model_keys, flat_model):
        if key not in flat_loaded:
            raise TrainingError(f"{where}: {key} (shape {_shape(spec)}) is missing from the checkpoint")
        if _shape(flat_loaded[key]) != _shape(spec):
            raise TrainingError(f"{where}: {key} has shape {_shape(flat_loaded[key])} in the checkpoint but "
                                f"{_shape(spec)} in the model (check model.* against the checkpoint's config)")
    extra = sorted(set(flat_loaded) - set(model_keys))
    if extra:
        raise TrainingError(f"{where}: the checkpoint has {extra[0]} (shape {_shape(flat_loaded[extra[0]])}) "
                            f"which the model does not" + (f", and {len(extra) - 1} more" if len(extra) > 1 else ""))
    leaves = [np.asarray(jax.device_get(flat_loaded[k])).astype(spec.dtype, copy=False)
              for k, (_, spec) in zip(model_keys, flat_model)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def trainable_for(cfg: Config, abstract_params):
    """The trainable mask of `train.finetune` (None: everything trains, for null and full)."""
    strategy = cfg.train.finetune
    if strategy in (None, "full"):
        return None
    if cfg.model.arch != "unet":
        raise TrainingError(f"train.finetune={strategy} selects U-Net stages; model.arch={cfg.model.arch} has "
                            f"none (use train.finetune=full or null)")
    try:
        return finetune.trainable_mask(abstract_params, strategy)
    except ValueError as e:
        raise TrainingError(f"train.finetune={strategy}: {e}") from e


# -------------------------------------------------------------------------------------- the loop


def train_and_evaluate(cfg: Config, workdir: str | os.PathLike, *, max_steps: int | None = None,
                       progress: bool = True) -> dict:
    """Train `cfg` in `workdir`, resuming from its last checkpoint if there is one.

    Without one, the parameters come from `train.init_from` when it is set (another run's best/last
    checkpoint; a fresh optimiser), else from random init; `train.finetune` freezes U-Net stages.

    `max_steps` stops early (tests, and a run killed and resumed must match one that was not: the
    schedule still follows train.epochs x train.steps_per_epoch). Returns a summary dict.

    One writer per run directory: process 0 holds `workdir`'s lock (jaxseg.locks) for the whole run;
    a second run on it fails at once with a LockError naming the holder.
    """
    distributed.initialize()
    cfg = restrict(cfg)  # a run's config holds the core's sections only (not a method's or the cohort's)
    held = locks.hold(workdir, f"train {cfg.experiment}", "--workdir") if distributed.is_main_process() \
        else contextlib.nullcontext()
    with held:
        return _train_and_evaluate(cfg, workdir, max_steps=max_steps, progress=progress)


def _train_and_evaluate(cfg: Config, workdir: str | os.PathLike, *, max_steps: int | None = None,
                        progress: bool = True) -> dict:
    """The sections in order: run directory, mesh, input, model and sharded init, step, checkpoint or
    resume, loop, summary."""
    workdir = Path(workdir)
    main = distributed.is_main_process()
    preprocessing, run_info = start_run_directory(cfg, workdir, write=main)
    # data.spacing null: the topology is planned on the dataset's median spacing, as nnU-Net does.
    spacing = rundir.model_spacing(cfg, preprocessing)
    mesh = make_mesh(cfg)
    data = make_input(cfg, spacing, preprocessing["store"]["fingerprint"])
    net = make_network(cfg, data.patch, mesh, spacing)
    runner = make_runner(cfg.train.parallel, net.model, cfg, net.optimizer, data.aug, data.patch, mesh)
    mgrs = Checkpoints(ckpt.manager(workdir / "ckpt", cfg.train.keep_checkpoints), ckpt.manager(workdir / "best", 1))
    try:
        state, best, init_source, latest = initial_state(cfg, workdir, net, data, mgrs.last, mesh)
    except BaseException:
        data.iterator.close()
        mgrs.close()
        raise
    if main:  # steps after the checkpoint are replayed and logged again
        truncate_metrics(workdir / "metrics.jsonl", latest or 0)
        transfer = net.transfer | ({"init_from": init_source} if init_source is not None else {})
        if transfer:
            write_json_atomic(workdir / rundir.RUN, {**run_info, "transfer": transfer})
    state = runner.to_device(state)
    total_steps = cfg.train.epochs * cfg.train.steps_per_epoch
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    try:
        state, step, skipped, best = run_steps(cfg, workdir, state, runner, data, net, mgrs, best, init_source,
                                               stop_at, progress=progress and main)
    finally:
        data.iterator.close()
        mgrs.close()
    return {"step": step, "total_steps": total_steps, "skipped_steps": skipped, "best": best,
            "params": runner.to_host(state).params, "train_cases": data.train_ids, "val_cases": data.val_ids,
            "dro_table": np.asarray(data.sampler.table)}


# --- Run directory ----------------------------------------------------------------------------------


def start_run_directory(cfg: Config, workdir: Path, write: bool) -> tuple[dict, dict | None]:
    """(preprocessing.json's record, run.json's record or None): after checking the store fits the config
    (a finished `prepare` whose classes / channels match, before anything is written), `write` (process
    0) puts config.yaml, run.json and preprocessing.json in `workdir` (jaxseg.rundir): what predict needs
    besides the parameters, there from the start, so the run directory never needs the store."""
    store.check_for_training(cfg.data.store, num_classes=cfg.data.num_classes, num_channels=cfg.data.num_channels)
    preprocessing = rundir.preprocessing_from_store(cfg.data.store)
    return preprocessing, (rundir.write_run(workdir, cfg, preprocessing) if write else None)


# --- Mesh -------------------------------------------------------------------------------------------


def make_mesh(cfg: Config):
    """The device mesh (axis `data`), after checking the batch splits over it."""
    mesh = distributed.make_mesh()
    n_dev = jax.device_count()
    if cfg.data.batch_size % n_dev:
        raise TrainingError(f"data.batch_size={cfg.data.batch_size} must be divisible by the {n_dev} devices")
    if cfg.train.parallel == "pmap" and jax.process_count() > 1:
        raise TrainingError("train.parallel=pmap is single-process here; use jit for multi-host runs")
    return mesh


# --- Input ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Input:
    """The host side of training: which cases, how they are drawn, and the patch batches."""

    store_root: Path
    train_ids: list
    val_ids: list
    source: CaseSource
    sampler: CaseSampler
    iterator: PatchBatchIterator
    ages: np.ndarray | None  # per training case, for the AgeU-Net target
    strata: list[str]  # per training case
    patch: tuple
    aug: AugmentParams
    store_fingerprint: str  # the store's content (resume refuses another)


def make_input(cfg: Config, spacing, store_fingerprint: str) -> Input:
    store_root = Path(cfg.data.store)
    all_train = CaseSource(store_root, split="train")
    train_ids, val_ids = select_cases(all_train.case_ids, cfg, store_root)
    # data.max_train_cases: fewer training subjects (label budgeting's "full"); validation is unchanged.
    train_ids = limit_cases(train_ids, cfg.data.max_train_cases, cfg.data.split_seed)
    source = CaseSource(store_root, split="train", case_ids=train_ids)
    d = cfg.dro
    sampler_mode = "hardness" if d.enabled and d.mode in ("sampling", "sampling_is") else "uniform"
    sampler = CaseSampler(len(source), mode=sampler_mode, seed=cfg.seed, beta=d.beta, floor=d.prob_floor,
                          init_loss=d.init_loss, init_noise=d.init_noise, case_ids=source.case_ids)
    # AgeU-Net: each patch regresses its subject's age (store meta "age", from the dataset metadata).
    ages = case_ages(source, store_root) if cfg.model.arch == "unet" and cfg.model.age_head else None
    topology = model_topology(cfg, spacing)
    patch = topology.patch_size if cfg.model.arch == "unet" else cfg.data.patch_size
    aug = for_patch(PRESETS[cfg.data.augment], patch)  # nnU-Net's dummy 2D rule for anisotropic patches
    # Room for rotation and scaling on the device (nnU-Net loads a larger region for the same reason;
    # in dummy 2D not along the out-of-plane axis, which neither rotates nor scales).
    margin = tuple(0 if a == aug.dummy_2d_axis else int(math.ceil(p * 0.25)) for a, p in enumerate(patch)) \
        if aug.needs_resampling else (0, 0, 0)
    budget = cfg.data.label_budget

    def budget_mask(case_id, shape):
        return slice_mask(shape, budget.axis, budget.fraction, budget.exclude_border, seed=cfg.seed,
                          case_id=case_id)

    iterator = PatchBatchIterator(source, sampler, batch_size=cfg.data.batch_size, patch_size=patch,
                                  margin=margin, foreground_oversampling=cfg.data.foreground_oversampling,
                                  oversample=cfg.data.oversample,
                                  threads=cfg.data.threads, prefetch=cfg.data.prefetch, seed=cfg.seed,
                                  mask_fn=budget_mask if budget.enabled else None)
    strata = [str(m.get("stratum") or "none") for m in source.metas]
    return Input(store_root, train_ids, val_ids, source, sampler, iterator, ages, strata, patch, aug,
                 store_fingerprint)


# --- Model, optimiser, sharded init ------------------------------------------------------------------


@dataclasses.dataclass
class Network:
    """The model, its optimiser, and the state's shapes and shardings known before any array exists."""

    model: Any
    optimizer: Any
    abstract_params: Any
    abstract_state: Any  # ShapeDtypeStructs, replicated on the mesh
    make_state: Callable  # init key -> a fresh, sharded TrainState
    state_from: Callable  # params -> a TrainState with a fresh optimiser, sharded
    init_key: jax.Array
    step_key: jax.Array
    transfer: dict  # for run.json, when the run fine-tunes


def make_network(cfg: Config, patch, mesh, spacing) -> Network:
    model = build_model(cfg, spacing)
    repl = NamedSharding(mesh, P())
    x_spec = jnp.zeros((1, *patch, cfg.data.num_channels), jnp.float32)
    init_key, step_key = jax.random.split(jax.random.key(cfg.seed))
    abstract_params = jax.eval_shape(lambda k: model.init(k, x_spec)["params"], init_key)
    # Transfer learning: `train.finetune` freezes U-Net stages (frozen leaves get zero updates and no
    # optimiser state); `train.init_from` starts from another run's parameters (a fresh optimiser).
    trainable = trainable_for(cfg, abstract_params)
    optimizer = make_optimizer(cfg.optim, cfg.train.epochs, cfg.train.steps_per_epoch, params=abstract_params,
                               trainable=trainable)
    transfer: dict = {}
    if trainable is not None or cfg.train.init_from is not None:
        transfer["finetune"] = cfg.train.finetune
        transfer["trainable"] = finetune.describe(trainable if trainable is not None else
                                                  jax.tree.map(lambda _: True, abstract_params), abstract_params)
        log.info("fine-tuning (train.finetune=%s): %s", cfg.train.finetune, transfer["trainable"])
    # The state is built where it lives: jit with replicated out_shardings, never on one device first.
    abstract_state = jax.eval_shape(lambda p: init_state(p, optimizer), abstract_params)
    abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), abstract_state)
    state_sharding = jax.tree.map(lambda _: repl, abstract_state)
    make_state = jax.jit(lambda k: init_state(model.init(k, x_spec)["params"], optimizer),
                         out_shardings=state_sharding)
    state_from = jax.jit(lambda p: init_state(p, optimizer), out_shardings=state_sharding)
    return Network(model, optimizer, abstract_params, abstract_state, make_state, state_from, init_key, step_key,
                   transfer)


# --- Checkpoint / resume ------------------------------------------------------------------------------


class Checkpoints(NamedTuple):
    last: Any  # the last `train.keep_checkpoints` steps (resume)
    best: Any  # the best validation Dice

    def close(self) -> None:
        self.last.close()
        self.best.close()


def initial_state(cfg: Config, workdir: Path, net: Network, data: Input, last_mgr, mesh):
    """(state, best, init_source, resumed step or None): the run's own last checkpoint (state, iterator
    position, DRO table and best so far), else `train.init_from`'s parameters, else random init."""
    best = {"val_dice": -math.inf, "step": None}
    latest = last_mgr.latest_step()
    if latest is not None:
        # A resumed run continues from its own checkpoint; train.init_from is not read again (it is in
        # the fingerprint, so a different one is refused here).
        ckpt.check_compatible(ckpt.read_meta(last_mgr, latest), cfg, workdir,
                              store_fingerprint=data.store_fingerprint)
        state, meta = ckpt.restore(last_mgr, latest, net.abstract_state, data.iterator)
        log.info("resumed from step %d", latest)
        if distributed.is_main_process():
            print(f"{workdir}: resumed from step {latest}", file=sys.stderr, flush=True)
        return state, meta.get("best", best), meta.get("init_source"), latest
    if cfg.train.init_from is not None:
        # The parameters of another run (its best checkpoint, else its last), checked against this
        # model; the optimiser state starts fresh. Every process reads the same checkpoint.
        loaded, src_meta, where = ckpt.load_init_params(cfg.train.init_from)
        host_params = match_params(loaded, net.abstract_params, cfg.train.init_from)
        repl = NamedSharding(mesh, P())
        params = jax.tree.map(lambda a: jax.make_array_from_callback(a.shape, repl, lambda i, a=a: a[i]),
                              host_params)
        init_source = {"path": str(Path(where).absolute()), "step": src_meta.get("step"),
                       "fingerprint": src_meta.get("fingerprint")}
        log.info("initialised the parameters from %s (step %s)", where, src_meta.get("step"))
        return net.state_from(params), best, init_source, None
    return net.make_state(net.init_key), best, None, None


# --- Loop ---------------------------------------------------------------------------------------------


def run_steps(cfg: Config, workdir: Path, state, runner: Runner, data: Input, net: Network, mgrs: Checkpoints,
              best: dict, init_source, stop_at: int, progress: bool):
    """Steps until `stop_at`: batch, step, DRO table, non-finite guard, logs, checkpoints, validation.
    Returns (state, step, skipped steps, best)."""
    total_steps = cfg.train.epochs * cfg.train.steps_per_epoch
    metric_log = MetricLog(workdir, distributed.is_main_process())
    step = int(jax.device_get(runner.to_host(state).step))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=stop_at, initial=step, unit="step", dynamic_ncols=True, desc=f"train {cfg.experiment}")
    train_log = TrainLog(data.strata, cfg.train.steps_per_epoch, class_names(cfg.data.store, cfg.data.num_classes))
    try:
        while step < stop_at:
            batch = next(data.iterator)
            feed = {k: batch[k] for k in ("image", "label", "mask", "case_index")}
            if data.ages is not None:
                feed["age"] = data.ages[np.asarray(batch["case_index"])]
            table = jnp.asarray(data.sampler.table, jnp.float32)
            state, metrics, case_index = runner.step(state, feed, net.step_key, table)
            step += 1
            train_log.drew(case_index, feed["label"], feed["mask"])
            if not bool(metrics["finite"]):
                train_log.skipped += 1
                check_nonfinite(cfg, workdir, step, runner.to_host(state), mgrs.last)
            else:
                # The DRO table takes this step's per-sample losses (in the process that draws cases).
                data.sampler.update(case_index, metrics["per_sample_loss"])
                train_log.losses.append(float(metrics["loss"]))
            if step % cfg.train.log_every == 0 or step == stop_at:
                record = train_log.flush(step, metrics)
                metric_log.write(step, **record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            if cfg.dro.enabled and step % cfg.dro.log_every == 0:
                metric_log.write(step, **dro_record(data.sampler.table, cfg.dro, data.strata, data.source.case_ids))
            if bar is not None:
                bar.update(1)
            if step % cfg.train.checkpoint_every == 0 or step == stop_at:
                ckpt.save(mgrs.last, step, runner.to_host(state), data.iterator,
                          ckpt.meta_record(cfg, step, best=best, init_source=init_source,
                                           store_fingerprint=data.store_fingerprint))
            if data.val_ids and (step % (cfg.train.val_every * cfg.train.steps_per_epoch) == 0
                                 or step == total_steps):
                best = validate_and_keep_best(cfg, step, runner.to_host(state), data, net, mgrs.best, metric_log,
                                              best, init_source, progress=bar is not None)
    finally:
        if bar is not None:
            bar.close()
        metric_log.close()
    return state, step, train_log.skipped, best


class TrainLog:
    """What the training log line reports between two lines: mean loss of the finite steps, steps/s,
    and the share of drawn samples per stratum (what the steps trained on)."""

    def __init__(self, strata: list[str], steps_per_epoch: int, class_names: list[str]):
        self.strata, self.steps_per_epoch, self.class_names = strata, steps_per_epoch, class_names
        self.skipped = 0  # over the whole run
        self.losses: list[float] = []
        self.drawn: dict[str, int] = {}
        self.voxels = np.zeros(len(class_names), np.int64)
        self.steps, self.t_last = 0, time.perf_counter()

    def drew(self, case_index, label=None, mask=None) -> None:
        """One step's drawn cases and (this process's) patch labels, counted where the loss mask is on."""
        self.steps += 1
        for i in np.asarray(case_index).reshape(-1):
            self.drawn[self.strata[int(i)]] = self.drawn.get(self.strata[int(i)], 0) + 1
        if label is not None:
            lab = np.asarray(label).reshape(-1).astype(np.int64)
            if mask is not None:
                lab = lab[np.asarray(mask).reshape(-1) > 0]
            self.voxels += np.bincount(np.clip(lab, 0, len(self.class_names) - 1), minlength=len(self.class_names))

    def flush(self, step: int, metrics: dict) -> dict:
        """The log record of the steps since the last one (`metrics`: the last step's), and a fresh start."""
        now = time.perf_counter()
        total = sum(self.drawn.values())
        record = {"loss": float(np.mean(self.losses)) if self.losses else float("nan"),
                  "grad_norm": float(metrics["grad_norm"]), "steps_per_s": self.steps / (now - self.t_last),
                  "skipped_steps": self.skipped, "epoch": step / self.steps_per_epoch,
                  "drawn_stratum": {k: v / total for k, v in sorted(self.drawn.items())}}
        if self.voxels.sum():  # what the patches contained: share of the trained voxels per class
            record["patch_class_share"] = {n: float(v / self.voxels.sum())
                                           for n, v in zip(self.class_names, self.voxels)}
        self.losses, self.drawn, self.t_last, self.steps = [], {}, now, 0
        self.voxels = np.zeros(len(self.class_names), np.int64)
        return record


def check_nonfinite(cfg: Config, workdir: Path, step: int, host_state, last_mgr) -> None:
    """The non-finite guard: the step already kept the parameters; stop after train.max_nonfinite in a row."""
    nonfinite = int(jax.device_get(host_state.nonfinite))
    log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, nonfinite)
    if nonfinite >= cfg.train.max_nonfinite:
        raise TrainingError(
            f"{nonfinite} consecutive non-finite steps (train.max_nonfinite="
            f"{cfg.train.max_nonfinite}) at step {step}; the last good checkpoint in "
            f"{workdir / 'ckpt'} (step {last_mgr.latest_step()}) is intact")


def dro_record(tab: np.ndarray, d, strata: list[str], case_ids) -> dict:
    """Where the DRO table stands: percentile bounds and quantiles of the per-case losses, the sampler's
    effective sample size and mass per stratum, and the three hardest cases."""
    p = dro_math.sampling_probs(tab, d.beta, d.prob_floor)
    hardest = np.argsort(-tab)[:3]
    return {
        "dro_bound_a05": float(dro_math.percentile_bound(tab, 0.05, d.beta)),
        "dro_bound_a10": float(dro_math.percentile_bound(tab, 0.10, d.beta)),
        "dro_q95": float(np.quantile(tab, 0.95)), "dro_q90": float(np.quantile(tab, 0.90)),
        "dro_ess": float(dro_math.effective_sample_size(p)),
        "dro_p_stratum": {s: float(p[[i for i, t in enumerate(strata) if t == s]].sum())
                          for s in sorted(set(strata))},
        "dro_table_spread": float(tab.max() - tab.min()),
        "dro_hardest": [{"case": case_ids[i], "stratum": strata[i], "loss": float(tab[i])} for i in hardest]}


def validate_and_keep_best(cfg: Config, step: int, host_state, data: Input, net: Network, best_mgr, metric_log,
                           best: dict, init_source, progress: bool) -> dict:
    """Validation Dice logged; a better one than `best` saves the state to `best_mgr`. Returns the best."""
    # predict's apply_fn: the highest-resolution logits (and ages); one compiled program for every
    # validation, the parameters are an argument
    apply_fn = make_apply_fn(net.model, {"params": host_state.params})
    val = validate(apply_fn, data.store_root, data.val_ids, cfg, data.patch, progress=progress)
    metric_log.write(step, **val)
    if val["val_dice"] > best["val_dice"]:
        best = {"val_dice": val["val_dice"], "step": step}
        ckpt.save(best_mgr, step, host_state, data.iterator,
                  ckpt.meta_record(cfg, step, best=best, init_source=init_source,
                                   store_fingerprint=data.store_fingerprint))
    return best
