"""jaxseg.runtime: the XLA / JAX settings every entry point gets from `import jaxseg`, never overriding the
user's, and recorded where results are written."""

import json
import os
import subprocess
import sys

import pytest

from jaxseg import runtime

PROBE = ("import json, os{pre}; import jaxseg; from jaxseg import runtime; "
         "print(json.dumps({{'flags': os.environ.get('XLA_FLAGS', ''), **runtime.record()}}))")


def probe(pre: str = "", **env) -> dict:
    base = {k: v for k, v in os.environ.items()
            if k not in ("XLA_FLAGS", "JAXSEG_ONEDNN", "JAX_THREEFRY_PARTITIONABLE", "JAXSEG_ADDED_XLA_FLAGS")}
    p = subprocess.run([sys.executable, "-c", PROBE.format(pre=pre)], env={**base, **env}, capture_output=True,
                       text=True, timeout=300, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_onednn_flags_added_and_recorded():
    r = probe(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert r["flags"].split() == ["--xla_force_host_platform_device_count=2", *runtime.ONEDNN_FLAGS]
    assert r["onednn_convolutions"] and r["onednn_flags"] == "set by jaxseg"
    assert r["jax_threefry_partitionable"] is False


@pytest.mark.parametrize("env,why", [
    ({"XLA_FLAGS": "--xla_cpu_use_onednn=false"}, "set by the user"),
    ({"JAXSEG_ONEDNN": "0"}, "off (JAXSEG_ONEDNN=0)"),
])
def test_user_choice_is_kept(env, why):
    r = probe(**env)
    assert r["flags"] == env.get("XLA_FLAGS", "")
    assert r["onednn_flags"] == why and not r["onednn_convolutions"]


def test_user_threefry_setting_is_kept():
    assert probe(JAX_THREEFRY_PARTITIONABLE="1")["jax_threefry_partitionable"] is True


def test_backend_started_before_jaxseg_is_reported():
    r = probe(pre="; import jax; jax.numpy.ones(1).block_until_ready()")
    assert r["backend_started_before_jaxseg"] and not r["onednn_convolutions"]


@pytest.mark.slow
def test_run_json_records_the_runtime(tmp_path, tiny_store):
    from _tiny import tiny_cfg

    from jaxseg.train.loop import train_and_evaluate

    train_and_evaluate(tiny_cfg(tiny_store), tmp_path, max_steps=1, progress=False)
    rec = json.loads((tmp_path / "run.json").read_text())["runtime"]
    assert rec == runtime.record() and rec["onednn_convolutions"]
