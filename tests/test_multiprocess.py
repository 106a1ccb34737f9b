"""Multi-process data parallelism: 2 processes x 4 CPU devices train like 1 process x 8 devices.

Two local processes join through jax.distributed (coordinator 127.0.0.1 on a free port, gloo for
the cross-process collectives on CPU, set up by ``jaxseg.distributed.initialize``), each reads
its half of the global batch of 8, and after 2 steps both hold the parameters a single process
with 8 fake devices reaches with the same config (up to float reordering of the cross-process
reductions). The same holds when the processes are told what they are by SLURM's variables
(as under ``srun``) instead of the launcher's JAXSEG_* ones. Each training run is a subprocess
(~20-35 s on 2 cores, half of it compiling; a compilation cache shared by the module's runs and
one single-process reference per config keep the module near 2 minutes).

The processes run ``tests/_train_worker.py`` with an explicit environment (the fake devices of
tests/conftest.py apply to this pytest process only).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


WORKER = Path(__file__).with_name("_train_worker.py")
TIMEOUT_S = 300  # per run (both processes); a hung collective fails here instead of hanging CI
STEPS = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> Path:
    """A persistent compilation cache shared by this module's subprocesses (fresh per session): runs
    of the same program (e.g. the two 2-process runs of the default config) compile once."""
    return tmp_path_factory.mktemp("xla_cache")


def worker_env(devices: int, cache: Path, **extra: str) -> dict:
    """This environment without launcher/SLURM variables, plus CPU with `devices` fake devices."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXSEG_", "SLURM_", "JAX_COMPILATION_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_THREEFRY_PARTITIONABLE="0", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)
    return env


def run_processes(cmd: list[str], envs: list[dict], logs: list[Path], timeout: float = TIMEOUT_S) -> None:
    """Start one process per env, wait for all; on a failure or the timeout kill the rest and fail
    with every process's output (stdout and stderr, in its log file)."""
    procs = []
    for env, log in zip(envs, logs):
        with open(log, "wb") as f:
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline = time.monotonic() + timeout
    problem = None
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                problem = "a process failed"
                break
            if time.monotonic() > deadline:
                problem = f"timed out after {timeout:.0f} s"
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if problem or any(codes):
        report = "\n".join(f"--- process {i} (exit {c}), {log}:\n{log.read_text(errors='replace')[-6000:]}"
                           for i, (c, log) in enumerate(zip(codes, logs)))
        pytest.fail(f"{' '.join(cmd)}: {problem or 'a process failed'}; exit codes {codes}\n{report}")


def load(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def single_process(tiny_store, tmp_path_factory, xla_cache):
    """`run(overrides)`: the reference, 1 process x 8 devices, trained once per overrides."""
    cache: dict = {}

    def run(overrides: list[str]) -> dict:
        key = tuple(overrides)
        if key not in cache:
            d = tmp_path_factory.mktemp("single")
            t0 = time.perf_counter()
            run_processes([sys.executable, str(WORKER), str(tiny_store), str(d / "run"), str(STEPS),
                           str(d / "out.npz"), *overrides], [worker_env(8, xla_cache)], [d / "run.log"])
            print(f"1 process x 8 devices: {time.perf_counter() - t0:.1f} s")
            cache[key] = load(d / "out.npz")
        return cache[key]

    return run


def two_processes(store: Path, tmp_path: Path, overrides: list[str], envs: list[dict]) -> tuple[dict, dict]:
    """Train with 2 processes x 4 devices; the results of process 0 and process 1."""
    t0 = time.perf_counter()
    run_processes([sys.executable, str(WORKER), str(store), str(tmp_path / "multi"), str(STEPS),
                   str(tmp_path / "multi.npz"), *overrides],
                  envs, [tmp_path / f"multi{i}.log" for i in range(2)])
    print(f"2 processes x 4 devices: {time.perf_counter() - t0:.1f} s")
    return load(tmp_path / "multi.npz"), load(tmp_path / "multi.process1.npz")


def check_same_training(ref: dict, got: dict, other: dict) -> None:
    assert int(ref["__step__"]) == int(got["__step__"]) == int(other["__step__"]) == STEPS
    assert sorted(ref) == sorted(got) == sorted(other)
    # The two processes hold identical replicas, and identical DRO tables (same global losses).
    for k in got:
        np.testing.assert_array_equal(other[k], got[k], err_msg=f"process 1 differs from process 0 at {k}")
    # ... and train like one process with all 8 devices (cross-process sums may be reordered).
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # The steps trained on real losses: the DRO table (init_loss 2.0 + 1e-4 noise) took the
    # all-gathered per-sample losses of both processes' slots.
    assert np.sum(np.abs(got["__dro_table__"] - 2.0) > 1e-2) >= 2


@pytest.mark.parametrize("overrides", [
    pytest.param([], id="erm"),
    # Hardness sampling with importance weights: step 2's draw reads the DRO table updated with step
    # 1's all-gathered losses, so the processes only agree if every one updated the same table.
    pytest.param(["dro.enabled=true", "dro.mode=sampling_is"], id="dro"),
])
@pytest.mark.slow
def test_two_processes_match_one_process(tiny_store, tmp_path, single_process, xla_cache, overrides):
    """The launcher's variables (launch/multiprocess.sh): JAXSEG_COORDINATOR/NUM_PROCESSES/PROCESS_ID."""
    coordinator = f"127.0.0.1:{free_port()}"
    envs = [worker_env(4, xla_cache, JAXSEG_COORDINATOR=coordinator, JAXSEG_NUM_PROCESSES="2", JAXSEG_PROCESS_ID=str(i))
            for i in range(2)]
    got, other = two_processes(tiny_store, tmp_path, overrides, envs)
    check_same_training(single_process(overrides), got, other)
    # Each process checkpointed its own data iterator state next to the shared train state.
    data = tmp_path / "multi" / "ckpt" / str(STEPS) / "data"
    assert sorted(p.name for p in data.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
def test_slurm_variables_start_the_same_run(tiny_store, tmp_path, single_process, xla_cache):
    """What srun gives each task (launch/slurm.sbatch): no JAXSEG_* variables, SLURM_NTASKS > 1, and
    jax.distributed's SLURM auto-detection finds the coordinator (first node of SLURM_STEP_NODELIST,
    port JAX_COORDINATOR_PORT) and the process ids (SLURM_PROCID)."""
    port = str(free_port())
    envs = [worker_env(4, xla_cache, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                       SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=port)
            for i in range(2)]
    got, other = two_processes(tiny_store, tmp_path, [], envs)
    check_same_training(single_process([]), got, other)
