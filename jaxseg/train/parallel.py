"""How the training loop runs a step on the devices: the one place that knows jit from pmap.

`jit` (the default) is data parallelism by sharding: the process-local batch becomes this process's
shard of a global array on the mesh's `data` axis, the state is replicated. `pmap` (train.parallel:
pmap, kept because users asked for it) replicates the state along a leading device axis and splits
the batch on it. Both give the loop the same things: a step on host batches returning host metrics,
and the state as the checkpoint stores it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxseg.train.step import (
    jit_step,
    make_step,
    pmap_step,
    replicate,
    split_for_pmap,
    unreplicate,
)

# Metrics with one entry per sample of the global batch; the others are scalars.
PER_SAMPLE = ("per_sample_loss", "weights")


class Runner(NamedTuple):
    """`step(state, feed, key, table) -> (state, metrics, case_index)`: one update on a process-local host
    batch; metrics and case_index come back as host arrays over the global batch.
    `to_device(state)`: the state as the step takes it; `to_host(state)`: as a checkpoint stores it."""

    step: Callable
    to_device: Callable
    to_host: Callable


def jit_runner(step_fn, mesh: Mesh) -> Runner:
    data_sharding = NamedSharding(mesh, P("data"))
    train_step = jit_step(step_fn, mesh)

    def step(state, feed, key, table):
        # Every process holds only its shard of the global batch (multi-host runs).
        global_batch = {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in feed.items()}
        state, metrics = train_step(state, global_batch, key, table)
        metrics = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) if k in PER_SAMPLE
                   else np.asarray(v) for k, v in metrics.items()}
        case_index = np.asarray(multihost_utils.process_allgather(global_batch["case_index"], tiled=True))
        return state, metrics, case_index

    return Runner(step, to_device=lambda s: s, to_host=lambda s: s)


def pmap_runner(step_fn_with_axis) -> Runner:
    if jax.process_count() > 1:
        raise ValueError("train.parallel=pmap is single-process here; use jit for multi-host runs")
    train_step = pmap_step(step_fn_with_axis)

    def step(state, feed, key, table):
        state, metrics = train_step(state, split_for_pmap(feed, jax.local_device_count()), key, table)
        metrics = {k: (np.asarray(v).reshape(-1) if k in PER_SAMPLE else np.asarray(v)[0])
                   for k, v in metrics.items()}
        return state, metrics, feed["case_index"]

    return Runner(step, to_device=lambda s: replicate(jax.device_get(s), jax.local_devices()),
                  to_host=unreplicate)


def make_runner(parallel: str, model, cfg, optimizer, aug, patch, mesh: Mesh) -> Runner:
    """The step of `train.parallel` (jit or pmap) for `model`."""
    if parallel == "pmap":
        return pmap_runner(make_step(model, cfg, optimizer, aug, patch, axis_name="data"))
    return jit_runner(make_step(model, cfg, optimizer, aug, patch), mesh)
