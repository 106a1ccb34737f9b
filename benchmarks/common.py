"""What every benchmark JSON records: device, versions, command, time of the run."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

try:  # before any jax backend starts: jaxseg sets its XLA flags (oneDNN convolutions on CPU) at import
    import jaxseg  # noqa: F401
except ImportError:  # torch-only workers run without it
    pass

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "tensorstore", "grain", "torch", "monai")


def environment() -> dict:
    import jax

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        rev = None
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": rev,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()),  # other work on a shared machine inflates times
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jaxseg_runtime": _runtime_record(),
        "versions": versions,
    }


def _runtime_record() -> dict | None:
    try:
        from jaxseg import runtime
    except ImportError:
        return None
    return runtime.record()


def set_strided(name: str | None) -> str:
    """Force the strided-convolution formulation (`space_to_depth` | `native`) for this process's backend;
    None or "default" keeps the library's choice. Returns the formulation in effect."""
    import jax

    from jaxseg.models.layers import STRIDED_CONV

    backend = jax.default_backend()
    if name and name != "default":
        STRIDED_CONV[backend] = name
    return STRIDED_CONV.get(backend, "native")


def timeit(fn, *args, repeats: int = 3) -> dict:
    """Compile (first call) timed apart from the steady-state calls; times in seconds."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"first_call_s": first, "times_s": times, "min_s": min(times), "median_s": sorted(times)[len(times) // 2]}


def write_json(path: str | Path, payload: dict) -> None:
    # jaxseg's one atomic writer (the results are written by processes that have jaxseg)
    from jaxseg.fileio import write_json_atomic

    write_json_atomic(path, payload, indent=2)
