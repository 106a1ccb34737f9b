"""The one place that starts JAX's multi-process runtime and builds the device mesh.

Multi-host runs start one process per host (or per GPU) with `jax.distributed`; every process runs
the same program, holds the same replicated state and reads only its slice of each global batch.
`launch/` has the launchers; they set the variables read here.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

ENV_COORDINATOR = "JAXSEG_COORDINATOR"  # host:port of process 0
ENV_NUM_PROCESSES = "JAXSEG_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSEG_PROCESS_ID"

_initialized = False


def initialize() -> None:
    """Start jax.distributed when the launcher asked for several processes (or under SLURM).

    Idempotent. On CPU the cross-process collectives go through gloo.
    """
    global _initialized
    if _initialized:
        return
    n = int(os.environ.get(ENV_NUM_PROCESSES, "1"))
    if n > 1:
        if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        coordinator = os.environ.get(ENV_COORDINATOR)
        pid = os.environ.get(ENV_PROCESS_ID)
        if coordinator is None or pid is None:
            raise RuntimeError(f"{ENV_NUM_PROCESSES}={n} needs {ENV_COORDINATOR} (host:port) and {ENV_PROCESS_ID}")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=int(pid))
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()  # JAX reads the SLURM variables itself
    _initialized = True


def make_mesh(devices=None) -> Mesh:
    """A 1D mesh over all devices of all processes, axis `data` (the global batch is split on it)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices), ("data",))


def is_main_process() -> bool:
    return jax.process_index() == 0
