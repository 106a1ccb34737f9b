"""Training worker the multi-process and kill/resume tests spawn (not a test module).

    python tests/_train_worker.py STORE WORKDIR MAX_STEPS OUT_NPZ [key=value ...]

Loads the tiny config of tests/test_train_loop.py (``tiny_cfg``) on STORE plus the extra
overrides, starts jax.distributed through ``jaxseg.distributed.initialize()`` (the JAXSEG_*
variables decide whether there are several processes), trains up to MAX_STEPS steps in WORKDIR
(resuming from WORKDIR/ckpt if a checkpoint is there) and, in process 0, writes the final
parameters to OUT_NPZ (one array per leaf, named by its jax.tree_util key path, plus
``__step__`` and ``__dro_table__``), atomically (a temporary file renamed into place), so a
reader never sees a partial file. Process i > 0 writes the same to STEM.process<i>.npz next to it.

The caller sets the environment (JAX_PLATFORMS, XLA_FLAGS for fake CPU devices,
JAX_THREEFRY_PARTITIONABLE, JAXSEG_*) before this starts: jax reads it at import.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Run as a script: make the repository importable without relying on an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The same settings as tests/test_train_loop.py's tiny_cfg (kept in sync by hand: tests/ is not a
# package, and importing a test module would import pytest here).
TINY_OVERRIDES = (
    "data.patch_size=[16,16,16]", "data.batch_size=8", "data.fold=all", "data.threads=1",
    "model.features_base=4", "model.features_max=8",
    "train.epochs=2", "train.steps_per_epoch=2", "train.checkpoint_every=1", "train.log_every=1",
    "data.augment=none",
)


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    store, workdir, max_steps, out = argv[0], argv[1], int(argv[2]), Path(argv[3])
    overrides = [f"data.store={store}", *TINY_OVERRIDES, *argv[4:]]

    import jax
    import numpy as np

    from jaxseg import distributed
    from jaxseg.config import load_config
    from jaxseg.train.loop import train_and_evaluate

    distributed.initialize()
    cfg = load_config(None, overrides)
    result = train_and_evaluate(cfg, workdir, max_steps=max_steps, progress=False)

    # Replicated parameters: every process holds a full copy and reads its own. Process 0 writes
    # OUT_NPZ; process i > 0 writes OUT_NPZ's sibling STEM.process<i>.npz (the tests check that
    # the replicas and the DRO tables of all processes agree).
    leaves = jax.tree_util.tree_flatten_with_path(result["params"])[0]
    arrays = {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf)) for path, leaf in leaves}
    arrays["__step__"] = np.asarray(result["step"])
    arrays["__dro_table__"] = np.asarray(result["dro_table"])
    pi = jax.process_index()
    target = out if pi == 0 else out.with_name(f"{out.stem}.process{pi}.npz")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp{os.getpid()}.npz")  # np.savez keeps a .npz name as is
    np.savez(tmp, **arrays)
    os.replace(tmp, target)
    print(f"worker {jax.process_index()}/{jax.process_count()}: {result['step']} steps, "
          f"{jax.device_count()} devices", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
