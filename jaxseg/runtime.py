"""Process-wide XLA and JAX settings, applied once when `jaxseg` is imported, for every entry point (CLI,
tests, benchmarks, `train_and_evaluate` called from Python).

- oneDNN convolutions on CPU (`--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true`):
  with jax >= 0.12 XLA:CPU then emits `__onednn$convolution` custom calls, several times faster than its
  own convolution loops (benchmarks/results/conv_cpu.json). Flags the user set are never overridden:
  if XLA_FLAGS already names either flag it is left alone; `JAXSEG_ONEDNN=0` opts out.
- Non-partitionable threefry, unless JAX_THREEFRY_PARTITIONABLE is set: the partitionable variant
  compiled a small U-Net's init 6x slower on CPU. Random values are identical across shardings either
  way, but differ between the two settings, so one seed gives one initialisation only with one setting.

XLA reads XLA_FLAGS when its first backend starts: if jax ran a computation before jaxseg was imported,
the flags cannot take effect and `record()` says so (it goes into every run.json and benchmark JSON).
"""

from __future__ import annotations

import os

ONEDNN_FLAGS = ("--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_custom_call=true")
_state: dict = {}


def configure() -> None:
    """Idempotent; called from jaxseg/__init__.py."""
    if _state:
        return
    import jax
    import jaxlib
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    _state["backend_started_before_jaxseg"] = xla_bridge.backends_are_initialized()
    if any(f.split("=")[0] in flags for f in ONEDNN_FLAGS):
        inherited = os.environ.get("JAXSEG_ADDED_XLA_FLAGS") == " ".join(ONEDNN_FLAGS)
        _state["onednn_flags"] = "set by jaxseg in a parent process" if inherited else "set by the user"
    elif os.environ.get("JAXSEG_ONEDNN", "1") == "0":
        _state["onednn_flags"] = "off (JAXSEG_ONEDNN=0)"
    elif _version(jaxlib.__version__) < (0, 12):
        # older XLA lacks the custom-call flag, and XLA aborts on an unknown flag
        _state["onednn_flags"] = f"off (jaxlib {jaxlib.__version__} < 0.12)"
    else:
        os.environ["XLA_FLAGS"] = " ".join([flags, *ONEDNN_FLAGS]).strip()
        os.environ["JAXSEG_ADDED_XLA_FLAGS"] = " ".join(ONEDNN_FLAGS)  # child processes inherit both
        _state["onednn_flags"] = "set by jaxseg"
    if "JAX_THREEFRY_PARTITIONABLE" not in os.environ:
        jax.config.update("jax_threefry_partitionable", False)


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:2] if p.isdigit())


def onednn_requested() -> bool:
    flags = os.environ.get("XLA_FLAGS", "")
    return "--xla_cpu_use_onednn=true" in flags and "--xla_cpu_experimental_onednn_custom_call=true" in flags


def record() -> dict:
    """The settings that change numbers or speed, for run.json and benchmark results."""
    import jax

    return {"xla_flags": os.environ.get("XLA_FLAGS", ""),
            "onednn_convolutions": onednn_requested() and not _state.get("backend_started_before_jaxseg", False),
            "onednn_flags": _state.get("onednn_flags"),
            "backend_started_before_jaxseg": _state.get("backend_started_before_jaxseg"),
            "jax_threefry_partitionable": bool(jax.config.jax_threefry_partitionable)}
