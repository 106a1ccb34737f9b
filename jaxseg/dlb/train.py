"""DeepLesionBrain training and prediction: `train_dlb(cfg, workdir)` and `predict_dlb(cfg, workdir, out)`.

Stages (hierarchical specialisation learning, method "hsl"):
Loss: ``loss.kind`` (the paper's generalised Jaccard is ``gen_jaccard``).

  1. generic: one compact U-Net on sub-volumes from every tile of every training case;
  2. ensemble: its best parameters copied into all tile networks, fine-tuned together, each on its
     own tile and its mirror partner's, flipped.
"independent" skips stage 1 (every network from its own random init); "generic" stops after it.

Data: the prepared case store, written with ``crop=False`` so that every case keeps the common
(MNI-registered) grid; the cases are read from tensorstore once and held in host memory (DLB's data
sets are small: ISBI has 21 training scans). Each stage keeps the best parameters on the validation
split (generalised Jaccard) and stops a network after ``patience`` epochs without improvement. Training
uses the core's optimiser (``optim``) and checkpoints (``workdir/<stage>/ckpt``, one per epoch, resumable;
the last holds the stage's best parameters); ``workdir/<stage>/history.json`` holds the per-epoch losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import locks, rundir
from jaxseg.config import restrict
from jaxseg.data import store
from jaxseg.data.augment import PRESETS
from jaxseg.data.io import DataError, save_nifti
from jaxseg.data.prepare import restore_geometry
from jaxseg.fileio import write_text_atomic
from jaxseg.dlb.model import build_model
from jaxseg.dlb import ensemble as ens
from jaxseg.dlb.grid import TileGrid, make_grid
from jaxseg.dlb.predict import make_predictor
from jaxseg.train import checkpoint as ckpt
from jaxseg.train.optim import make_optimizer
from jaxseg.train.step import segmentation_loss_fn
from jaxseg.dlb.config import DLBRunConfig

Pick = tuple[int, int]  # (case index, tile index)


# ----------------------------------------------------------------------------------------- data

def split_cases(store_root, cfg: DLBRunConfig) -> dict[str, list[str]]:
    """train / val / test case ids from the store: test = split "test"; the rest, restricted to
    ``dlb.train_sites``, split into train and val (``val_fraction``, seeded)."""
    root = Path(store_root)
    ids = store.list_cases(root)
    if not ids:
        raise DataError(f"{root}: no prepared cases (run `launch prepare` with crop disabled first)")
    metas = {c: store.read_case_meta(root, c) for c in ids}
    test = [c for c in ids if metas[c].get("split") == "test"]
    pool = [c for c in ids if metas[c].get("split") != "test"]
    if cfg.dlb.train_sites is not None:
        sites = {str(s) for s in cfg.dlb.train_sites}
        pool = [c for c in pool if str(metas[c].get("site")) in sites]
    if len(pool) < 2:
        raise DataError(f"{root}: {len(pool)} training cases for sites {cfg.dlb.train_sites}; need at least 2")
    rng = np.random.default_rng(cfg.data.split_seed)
    order = rng.permutation(len(pool))
    n_val = max(1, int(round(cfg.dlb.val_fraction * len(pool))))
    val = sorted(pool[i] for i in order[:n_val])
    train = sorted(pool[i] for i in order[n_val:])
    return {"train": train, "val": val, "test": test}


def load_cases(store_root, case_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Images (n, X, Y, Z, C) float32 and labels (n, X, Y, Z) uint8 of cases on one common grid."""
    root = Path(store_root)
    crop = store.read_dataset_meta(root).get("preprocessing", {}).get("crop")
    if crop != "none":
        raise DataError(f"{root}: prepared with crop {crop!r}; DeepLesionBrain needs the whole registered grid "
                        "(prepare with crop disabled: `launch prepare ... --no-crop`)")
    images, labels, metas, shape = [], [], [], None
    for c in case_ids:
        case = store.open_case(root, c)
        if shape is not None and case.shape != shape:
            raise DataError(f"{case.path}: shape {case.shape} differs from {shape} of {case_ids[0]}; "
                            "DeepLesionBrain needs every volume on one registered grid")
        shape = case.shape
        img, lab = store.read_patch(case, (0, 0, 0), case.shape)
        if lab is None:
            raise DataError(f"{case.path}: no label; training cases need one")
        images.append(img)
        labels.append(lab)
        metas.append(case.meta)
    return np.stack(images), np.stack(labels), metas


def grid_for(cfg: DLBRunConfig, shape) -> TileGrid:
    d = cfg.dlb
    return make_grid(shape, d.tile_size, d.tiles_per_axis, d.stride, d.offset)


def network_pools(grid: TileGrid, labels: np.ndarray, lesion_only: bool) -> list[list[Pick]]:
    """Per network: the (case, tile) sub-volumes it trains on (its own tile and its mirror's).

    With ``lesion_only`` only sub-volumes with a lesion voxel (reference code); a network whose region
    has none in any case falls back to all of its sub-volumes rather than not training.
    """
    pools = []
    for k in range(grid.n_networks):
        every = [(c, t) for c in range(len(labels)) for t, _ in grid.tiles_of(k)]
        keep = [(c, t) for c, t in every if labels[c][grid.slices(t)].any()] if lesion_only else every
        pools.append(keep or every)
    return pools


def gather(images: np.ndarray, labels: np.ndarray, grid: TileGrid, picks: Sequence[Sequence[Pick]]):
    """(N, B) picks -> image (N, B, T..., C), label (N, B, T...) int32, mirrored tiles flipped along x."""
    n, b = len(picks), len(picks[0])
    img = np.empty((n, b) + grid.tile + (images.shape[-1],), np.float32)
    lab = np.empty((n, b) + grid.tile, np.int32)
    for i, row in enumerate(picks):
        for j, (c, t) in enumerate(row):
            sl = grid.slices(t)
            x, y = images[c][sl], labels[c][sl]
            if grid.network_of(t)[1]:
                x, y = x[::-1], y[::-1]
            img[i, j], lab[i, j] = x, y
    return img, lab


class PoolSampler:
    """Per network, passes over its pool in a fresh seeded order; ``next()`` -> (N, B) picks."""

    def __init__(self, pools: list[list[Pick]], batch: int, seed: int):
        self.pools, self.batch = pools, batch
        self.rngs = [np.random.default_rng([seed, k]) for k in range(len(pools))]
        self.queues: list[list[int]] = [[] for _ in pools]

    def state(self, n: int) -> dict:
        """JSON of the first n networks' RNG states and queues (the checkpoint's data position)."""
        return {"rngs": [r.bit_generator.state for r in self.rngs[:n]], "queues": self.queues[:n]}

    def restore(self, state: dict) -> None:
        for r, s in zip(self.rngs, state["rngs"]):
            r.bit_generator.state = s
        for k, q in enumerate(state["queues"]):
            self.queues[k] = list(q)

    def next(self) -> list[list[Pick]]:
        out = []
        for k, pool in enumerate(self.pools):
            row = []
            for _ in range(self.batch):
                if not self.queues[k]:
                    self.queues[k] = self.rngs[k].permutation(len(pool)).tolist()
                row.append(pool[self.queues[k].pop()])
            out.append(row)
        return out


def val_picks(pools: list[list[Pick]], limit: int | None, seed: int) -> list[list[Pick]]:
    """Equal-length validation lists per network (short ones repeat, which keeps their mean)."""
    rng = np.random.default_rng(seed)
    if limit is not None:
        pools = [[p[i] for i in sorted(rng.choice(len(p), limit, replace=False))] if len(p) > limit else p
                 for p in pools]
    m = max(len(p) for p in pools)
    return [[p[i % len(p)] for i in range(m)] for p in pools]


# ------------------------------------------------------------------------------------- training

# What changes a stage's trajectory (the resume guard compares these); the core loop's train.* keys
# do not apply to DLB stages.
TRAJECTORY_KEYS = ("seed", "data", "model", "loss", "optim", "dlb")
KEEP_CHECKPOINTS = 2


def _eval_fn(model, loss, chunk: int = 4):
    """One network's mean loss over its validation sub-volumes, `chunk` at a time (bounded memory)."""
    net_eval = ens.make_net_eval(model, loss=loss)

    def fn(params, image, label):
        losses = jax.lax.map(lambda xy: net_eval(params, xy[0][None], xy[1][None]), (image, label),
                             batch_size=chunk)
        return jnp.mean(losses)

    return fn


@dataclasses.dataclass
class _Stopping:
    """Per-network early stopping (arrays over the padded network axis) and the epoch history."""

    best: np.ndarray
    bad: np.ndarray
    active: np.ndarray
    rows: list = dataclasses.field(default_factory=list)

    @classmethod
    def fresh(cls, n_pad: int) -> _Stopping:
        return cls(np.full(n_pad, np.inf), np.zeros(n_pad, int), np.ones(n_pad, bool))

    def update(self, val: np.ndarray, patience: int) -> np.ndarray:
        """Take one epoch's validation losses; returns which networks improved."""
        val = np.where(np.isfinite(val), val, np.inf)
        improved = self.active & (val < self.best)
        self.best = np.where(improved, val, self.best)
        self.bad = np.where(improved, 0, self.bad + 1)
        self.active &= self.bad < patience
        return improved

    def record(self, n: int) -> dict:
        """JSON of the first n networks (padding networks repeat network 0 and are rebuilt on resume)."""
        return {"best": [float(b) if np.isfinite(b) else None for b in self.best[:n]],
                "bad": self.bad[:n].tolist(), "active": self.active[:n].tolist(), "rows": self.rows}

    @classmethod
    def from_record(cls, rec: dict, n_pad: int) -> _Stopping:
        pad = lambda xs: list(xs) + [xs[0]] * (n_pad - len(xs))
        best = np.array([np.inf if b is None else b for b in pad(rec["best"])], float)
        return cls(best, np.array(pad(rec["bad"]), int), np.array(pad(rec["active"]), bool), list(rec["rows"]))


def _unpadded(tree, n: int):
    """Host copy of the first n networks (scalars as they are): checkpoints do not depend on the mesh."""
    return jax.tree.map(lambda x: np.asarray(x)[:n] if np.ndim(x) else np.asarray(x), tree)


def _on_mesh(tree, n_pad: int, mesh):
    return ens.shard_networks(ens.pad_networks(tree, n_pad), mesh)


def _resume(mgr, cfg: DLBRunConfig, workdir: Path, target):
    """(restored {"params", "train"}, meta) of a stage's last checkpoint, or None; a checkpoint written
    with a different trajectory-defining config is refused (jaxseg.train.checkpoint.check_compatible)."""
    latest = mgr.latest_step()
    if latest is None:
        return None
    ckpt.check_compatible(ckpt.read_meta(mgr, latest), cfg, workdir, TRAJECTORY_KEYS)
    return ckpt.restore(mgr, latest, target, None)


def train_stage(name: str, model, cfg: DLBRunConfig, workdir: Path, images, labels, grid: TileGrid,
                pools: list[list[Pick]], vpools: list[list[Pick]], val_images, val_labels, params, *,
                batch: int, steps_per_epoch: int, max_epochs: int, patience: int, seed: int,
                mesh=None, log=print) -> tuple[object, dict]:
    """Train stacked networks (leading axis = len(pools)) with per-network early stopping.

    The core's optimiser (``optim``: kind, schedule over ``max_epochs`` x ``steps_per_epoch``, weight
    decay, clipping) and checkpoints: after every epoch ``workdir/<name>/ckpt`` holds the ensemble's
    train state, the best parameters so far, the samplers' RNG states and the early-stopping record, so
    a killed stage resumes from its last epoch and ends as an uninterrupted one; a finished stage is not
    trained again. Returns (best stacked params, history); the history has the per-epoch mean training
    and validation loss, the number of networks still training, and seconds.
    """
    n = len(pools)
    n_pad = ens.padded_size(n, mesh)
    pad_rows = lambda rows: rows + [rows[0]] * (n_pad - n)
    tx = make_optimizer(cfg.optim, max_epochs, steps_per_epoch)
    loss = segmentation_loss_fn(cfg)  # the paper's: loss.kind gen_jaccard
    step = ens.ensemble_step(ens.make_net_step(model, tx, PRESETS[cfg.data.augment], loss=loss),
                             cfg.dlb.group_size, mesh)
    evaluate = jax.jit(ens.over_networks(_eval_fn(model, loss), cfg.dlb.group_size, mesh, 3))
    sampler = PoolSampler(pad_rows(pools), batch, seed)
    out = workdir / name
    out.mkdir(parents=True, exist_ok=True)
    fresh = _unpadded(ens.init_state(params, tx), n)
    with contextlib.closing(ckpt.manager(out / "ckpt", KEEP_CHECKPOINTS)) as mgr:
        resumed = _resume(mgr, cfg, workdir, {"params": fresh.params, "train": fresh})
        stop, g, best_params, train, done = _Stopping.fresh(n_pad), 0, fresh.params, fresh, False
        if resumed is not None:
            saved, meta = resumed
            stop, g, done = _Stopping.from_record(meta["stopping"], n_pad), int(meta["step"]), meta["done"]
            best_params, train = saved["params"], saved["train"]
            if isinstance(train, dict):
                train = ens.EnsembleState(**train)
            sampler.restore(meta["sampler"])
            log(f"[{name}] resumed from epoch {len(stop.rows)} (step {g})"
                + (", finished" if done else ""))
        if not done:
            state = ens.EnsembleState(_on_mesh(train.params, n_pad, mesh), _on_mesh(train.opt_state, n_pad, mesh),
                                      jnp.asarray(train.step, jnp.int32))
            best_params = _on_mesh(best_params, n_pad, mesh)
            vimg, vlab = gather(val_images, val_labels, grid, pad_rows(vpools))
            vimg, vlab = ens.shard_networks((jnp.asarray(vimg), jnp.asarray(vlab)), mesh)
            key = jax.random.PRNGKey(seed)
            t0 = time.perf_counter() - (stop.rows[-1]["seconds"] if stop.rows else 0.0)
            for epoch in range(len(stop.rows), max_epochs):
                losses = []
                act = jnp.asarray(stop.active)
                for _ in range(steps_per_epoch):
                    img, lab = gather(images, labels, grid, sampler.next())
                    state, loss_ = step(state, img, lab, ens.step_keys(key, g, n_pad), act)
                    losses.append(loss_)
                    g += 1
                train_loss = np.asarray(jnp.stack(losses))[:, :n].mean(axis=0)
                val = np.asarray(evaluate(state.params, vimg, vlab))
                best_params = ens.select(jnp.asarray(stop.update(val, patience)), state.params, best_params)
                row = {"epoch": epoch + 1, "step": g, "train_loss": float(np.nanmean(train_loss)),
                       "val_loss": float(np.mean(val[:n])), "best_val_loss": float(np.mean(stop.best[:n])),
                       "active": int(stop.active[:n].sum()), "seconds": time.perf_counter() - t0}
                stop.rows.append(row)
                done = epoch + 1 == max_epochs or not stop.active[:n].any()
                ckpt.save(mgr, g, {"params": _unpadded(best_params, n), "train": _unpadded(state, n)}, None,
                          ckpt.meta_record(cfg, g, TRAJECTORY_KEYS, stage=name, stopping=stop.record(n),
                                           sampler=sampler.state(n), done=done))
                log(f"[{name}] epoch {row['epoch']}: train {row['train_loss']:.4f} val {row['val_loss']:.4f} "
                    f"best {row['best_val_loss']:.4f}, {row['active']}/{n} networks training, "
                    f"{row['seconds']:.0f} s")
                if done:
                    break
            best_params = _unpadded(best_params, n)
    history = {"stage": name, "networks": n, "epochs": stop.rows,
               "best_val_loss": [float(b) for b in stop.best[:n]],
               "seconds": stop.rows[-1]["seconds"] if stop.rows else 0.0, "steps": g}
    write_text_atomic(out / "history.json", json.dumps(history, indent=1))
    return best_params, history


def stage_params(workdir, stage: str):
    """The best parameters (stacked) of a finished stage of a `train_dlb` run in workdir."""
    directory = Path(workdir) / stage
    try:
        params, meta = ckpt.load_params(directory, "last")
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory}: no trained parameters (run `launch dlb-train` first)") from None
    if not meta.get("done"):
        raise FileNotFoundError(f"{directory}: stage {stage!r} stopped at step {meta.get('step')} before it "
                                "finished (run the same `launch dlb-train` again to resume it)")
    return params


def check_resumable(cfg: DLBRunConfig, workdir: Path) -> None:
    """Refuse, before anything is written, a workdir whose stage checkpoints came from another config."""
    for stage in ("generic", "ensemble"):
        directory = workdir / stage / "ckpt"
        if directory.is_dir():
            with contextlib.closing(ckpt.manager(directory, KEEP_CHECKPOINTS)) as mgr:
                latest = mgr.latest_step()
                if latest is not None:
                    ckpt.check_compatible(ckpt.read_meta(mgr, latest), cfg, workdir, TRAJECTORY_KEYS)


def train_dlb(cfg: DLBRunConfig, workdir, *, mesh=None, log=print) -> dict:
    """Both stages as ``cfg.dlb.method`` says; returns a summary (also written to workdir/train.json).

    A killed run resumes from its stages' checkpoints. ``mesh`` (`launch dlb-train` builds the tile mesh
    over every device) shards the ensemble's networks. One writer per workdir (jaxseg.locks)."""
    # A finished `prepare` whose classes / channels match the config, checked before anything is written.
    store.check_for_training(cfg.data.store, num_classes=cfg.data.num_classes, num_channels=cfg.data.num_channels)
    workdir = Path(workdir)
    check_resumable(cfg, workdir)
    with locks.hold(workdir, f"dlb-train {cfg.experiment}", "--workdir"):
        # config.yaml (no synth section: the ablation's), run.json, preprocessing.json: dlb-predict reads them
        rundir.write_run(workdir, restrict(cfg, DLBRunConfig), rundir.preprocessing_from_store(cfg.data.store))
        return _train_dlb(cfg, workdir, mesh=mesh, log=log)


def _train_dlb(cfg: DLBRunConfig, workdir: Path, *, mesh, log) -> dict:
    d = cfg.dlb
    split = split_cases(cfg.data.store, cfg)
    images, labels, _ = load_cases(cfg.data.store, split["train"])
    vimages, vlabels, _ = load_cases(cfg.data.store, split["val"])
    grid = grid_for(cfg, images.shape[1:4])
    model = build_model(cfg)
    pools = network_pools(grid, labels, d.lesion_only)
    vpools = network_pools(grid, vlabels, lesion_only=False)
    summary: dict = {"method": d.method, "split": split, "grid": {"shape": grid.shape, "tile": grid.tile,
                                                                   "starts": grid.starts},
                     "augment": cfg.data.augment}
    log(f"DLB {d.method}: {len(split['train'])} training / {len(split['val'])} validation cases, "
        f"{grid.n_tiles} tiles of {grid.tile} on {grid.shape}, {grid.n_networks} networks, augment {cfg.data.augment}")
    key = jax.random.PRNGKey(cfg.seed)
    sample_shape = grid.tile + (images.shape[-1],)
    if d.method in ("hsl", "generic"):
        gpool = [sorted({p for pool in pools for p in pool})]
        gval = val_picks([sorted({p for pool in vpools for p in pool})], d.val_max_subvolumes, cfg.seed)
        steps = d.generic_steps_per_epoch or max(1, math.ceil(len(gpool[0]) / d.generic_batch_size))
        init = ens.init_stacked(model, key, 1, sample_shape)
        generic, hist = train_stage("generic", model, cfg, workdir, images, labels, grid, gpool, gval, vimages,
                                    vlabels, init, batch=d.generic_batch_size, steps_per_epoch=steps,
                                    max_epochs=d.generic_max_epochs, patience=d.generic_patience, seed=cfg.seed,
                                    mesh=None, log=log)
        summary["generic"] = {k: hist[k] for k in ("seconds", "steps", "best_val_loss")}
        summary["generic"]["epochs"] = len(hist["epochs"])
    if d.method != "generic":
        if d.method == "hsl":
            init = ens.broadcast(ens.unstack(generic, 0), grid.n_networks)
        else:
            init = ens.init_stacked(model, jax.random.fold_in(key, 1), grid.n_networks,
                                    sample_shape)
        steps = d.steps_per_epoch or max(1, math.ceil(max(len(p) for p in pools) / d.batch_size))
        _, hist = train_stage("ensemble", model, cfg, workdir, images, labels, grid, pools,
                              val_picks(vpools, None, cfg.seed), vimages, vlabels, init, batch=d.batch_size,
                              steps_per_epoch=steps, max_epochs=d.max_epochs, patience=d.patience,
                              seed=cfg.seed + 1, mesh=mesh, log=log)
        summary["ensemble"] = {k: hist[k] for k in ("seconds", "steps")}
        summary["ensemble"]["epochs"] = len(hist["epochs"])
        summary["ensemble"]["mean_best_val_loss"] = float(np.mean(hist["best_val_loss"]))
    write_text_atomic(workdir / "train.json", json.dumps(summary, indent=1, default=str))
    return summary




# ------------------------------------------------------------------------------------ prediction

def predictor_for(cfg: DLBRunConfig, workdir, shape, *, mesh=None):
    """(predict(volume) -> (labels, scores), grid) from the parameters a `train_dlb` run left in workdir."""
    workdir = Path(workdir)
    grid = grid_for(cfg, shape)
    model = build_model(cfg)
    if cfg.dlb.method == "generic":
        params = ens.unstack(stage_params(workdir, "generic"), 0)
        fn = make_predictor(model, grid, fusion=cfg.dlb.fusion, stacked=False, group_size=cfg.dlb.group_size)
    else:
        params = stage_params(workdir, "ensemble")
        n_pad = ens.padded_size(grid.n_networks, mesh)
        params = ens.shard_networks(ens.pad_networks(params, n_pad), mesh)
        fn = make_predictor(model, grid, fusion=cfg.dlb.fusion, group_size=cfg.dlb.group_size, mesh=mesh)
    return (lambda volume: fn(params, volume)), grid


def predict_dlb(cfg: DLBRunConfig, workdir, out_dir, case_ids: Sequence[str] | None = None, *, mesh=None,
                log=print) -> list[dict]:
    """Segment store cases (default: the test split) and write NIfTI label maps in each input's geometry."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(cfg.data.store)
    if case_ids is None:
        case_ids = split_cases(root, cfg)["test"]
    results, predict = [], None
    for c in case_ids:
        case = store.open_case(root, c)
        img, _ = store.read_patch(case, (0, 0, 0), case.shape)
        if predict is None:
            predict, _ = predictor_for(cfg, workdir, case.shape, mesh=mesh)
        t0 = time.perf_counter()
        seg, _ = predict(jnp.asarray(img))
        seg = np.asarray(seg).astype(np.uint8)
        seconds = time.perf_counter() - t0
        full = restore_geometry(seg, case.meta)
        path = out_dir / f"{c}.nii.gz"
        save_nifti(path, full, np.asarray(case.meta["original_affine"], np.float64))
        results.append({"case": c, "path": str(path), "seconds": seconds, "site": case.meta.get("site")})
        log(f"predicted {c} in {seconds:.1f} s -> {path}")
    return results
