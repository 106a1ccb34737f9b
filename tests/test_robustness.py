"""Issue 14, predict / evaluate / run directory side: a user's mistake is one line on stderr and exit
code 1 (no traceback, nothing half-written), one writer per run directory / store / output folder,
resumes that do not log a step twice, and the README's predict -> evaluate flow."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jaxseg.locks import LockError, hold

REPO = Path(__file__).resolve().parent.parent


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


# --------------------------------------------------------------------------- locks


_HOLDER = "import sys, time; from jaxseg.locks import hold\nwith hold(sys.argv[1], 'test holder'):\n" \
          "    print('held', flush=True); time.sleep(600)\n"


def test_lock_names_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "w")], stdout=subprocess.PIPE,
                            text=True, env=_env())
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"{tmp_path / 'w'}.*pid {proc.pid} on "), \
                hold(tmp_path / "w", "second"):
            pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with hold(tmp_path / "w", "after the kill") as path:  # the kernel dropped the dead holder's lock
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "w" / ".lock").exists()
