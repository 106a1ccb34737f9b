"""A training process killed with SIGKILL and started again ends exactly where an uninterrupted
run ends (bit for bit on CPU).

The killed process gets no chance to clean up: no ``finally``, no checkpoint flush. It is killed
while it writes the checkpoint after step 2 or later (the kill waits for a finished step >= 2
and, if it sees one in time, for the next step's ``*.orbax-checkpoint-tmp`` directory, so the
restart also finds a partial checkpoint to ignore). Rerunning the same command resumes from the
last finished checkpoint: train state, optimiser state, data iterator position and DRO table
(or grain's static stream position) and must reproduce the uninterrupted run exactly.

One process with 1 fake CPU device (the sharded multi-device restore is covered in-process by
tests/test_train_loop.py); each variant runs 3 subprocesses. They share a persistent compilation
cache (the uninterrupted run compiles, the other two load the same executable), so the comparison
isolates what the restart restores, not whether XLA compiles the same program twice the same way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


WORKER = Path(__file__).with_name("_train_worker.py")
TIMEOUT_S = 300
STEPS = 6
# 3 epochs x 2 steps: the learning-rate schedule covers the 6 steps of both runs.
OVERRIDES = ["train.epochs=3", "train.checkpoint_every=1", "train.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> Path:
    """A persistent compilation cache shared by the runs of this module (fresh per session)."""
    return tmp_path_factory.mktemp("xla_cache")


def worker_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXSEG_", "SLURM_", "JAX_COMPILATION_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_THREEFRY_PARTITIONABLE="0", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def start(cmd: list[str], log: Path, cache: Path) -> subprocess.Popen:
    with open(log, "ab") as f:  # the resumed run appends to the killed run's log
        return subprocess.Popen(cmd, env=worker_env(cache), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group, killed as one


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_to_end(cmd: list[str], log: Path, cache: Path) -> None:
    proc = start(cmd, log, cache)
    try:
        code = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        code = f"timeout after {TIMEOUT_S} s"
    if code != 0:
        pytest.fail(f"{' '.join(cmd)}: exit {code}\n{log.read_text(errors='replace')[-6000:]}")


def finished_steps(ckpt_dir: Path) -> list[int]:
    """Committed checkpoints only: orbax writes `N.orbax-checkpoint-tmp` and renames it to `N`."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def partial_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name.split(".")[0]) for p in ckpt_dir.iterdir()
                  if ".orbax-checkpoint-tmp" in p.name and p.name.split(".")[0].isdigit())


def logged_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def load(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("overrides", [
    pytest.param([], id="uniform"),  # static sampler: grain pipeline with thread prefetch
    pytest.param(["dro.enabled=true", "dro.mode=sampling_is"], id="dro"),  # live hardness sampler + table
])
@pytest.mark.slow
def test_sigkill_then_rerun_matches_uninterrupted_run(tiny_store, tmp_path, xla_cache, overrides):
    def cmd(workdir: Path, out: Path) -> list[str]:
        return [sys.executable, str(WORKER), str(tiny_store), str(workdir), str(STEPS), str(out),
                *OVERRIDES, *overrides]

    t0 = time.perf_counter()
    run_to_end(cmd(tmp_path / "ref", tmp_path / "ref.npz"), tmp_path / "ref.log", xla_cache)
    t1 = time.perf_counter()

    # --- Start, wait for a finished checkpoint >= 2, SIGKILL the process group ---------------
    workdir, log = tmp_path / "cut", tmp_path / "cut.log"
    ckpt_dir = workdir / "ckpt"
    proc = start(cmd(workdir, tmp_path / "cut.npz"), log, xla_cache)
    deadline = time.monotonic() + TIMEOUT_S
    mid_save = False
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before it could be killed; finished "
                            f"checkpoints {finished_steps(ckpt_dir)}\n{log.read_text(errors='replace')[-6000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint >= 2 after {TIMEOUT_S} s\n{log.read_text(errors='replace')[-6000:]}")
            done = finished_steps(ckpt_dir)
            last = done[-1] if done else 0
            # Best: in the middle of writing the checkpoint after the last finished one; if that
            # window is missed, as soon as a second finished checkpoint >= 2 shows up.
            mid_save = last >= 2 and any(s > last for s in partial_steps(ckpt_dir))
            if mid_save or last >= 3:
                break
            time.sleep(0.005)
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    t2 = time.perf_counter()
    at_kill = finished_steps(ckpt_dir)
    assert 2 <= at_kill[-1] < STEPS, at_kill
    assert not (tmp_path / "cut.npz").exists()
    n_logged = len(logged_steps(workdir))
    print(f"killed {'while writing checkpoint ' + str(partial_steps(ckpt_dir)) if mid_save else 'between steps'}"
          f"; finished checkpoints {at_kill}, {n_logged} steps logged")

    # --- The same command again: resumes from the last finished checkpoint -------------------
    run_to_end(cmd(workdir, tmp_path / "cut.npz"), log, xla_cache)
    t3 = time.perf_counter()
    print(f"uninterrupted {t1 - t0:.1f} s, killed after {t2 - t1:.1f} s, resumed {t3 - t2:.1f} s")

    # It resumed (did not start over) from the last finished checkpoint, and the steps it replayed
    # replaced the killed run's lines: every step is logged once.
    assert f"resumed from step {at_kill[-1]}" in log.read_text(errors="replace")
    assert logged_steps(workdir) == list(range(1, STEPS + 1)), (at_kill, n_logged)
    assert finished_steps(ckpt_dir)[-1] == STEPS and not partial_steps(ckpt_dir)

    ref, got = load(tmp_path / "ref.npz"), load(tmp_path / "cut.npz")
    assert sorted(ref) == sorted(got)
    assert int(got["__step__"]) == STEPS
    for k in ref:  # parameters, step and DRO table: bit for bit
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
