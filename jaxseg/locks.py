"""One writer per folder: an advisory lock file `<folder>/.lock` (fcntl.flock).

The kernel drops a flock when its holder exits, even on kill -9, so a crashed run never leaves a
lock behind; the file's text (pid, host, start time, what) only says who holds it. flock is local to
one machine: on some network file systems it does not exclude a process on another host.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from jaxseg.fileio import OutputError, output_dir

LOCK_NAME = ".lock"


class LockError(RuntimeError):
    """The folder is in use by another process; the message names it, the holder's pid and host."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (f"{info.get('what', 'another process')} (pid {info.get('pid')} on {info.get('host')}, "
            f"since {info.get('started')})")


@contextlib.contextmanager
def hold(folder: str | os.PathLike, what: str, flag: str = "") -> Iterator[Path]:
    """Hold `folder`'s lock for the `with` block, creating the folder (checked writable) first; a
    folder created here and left empty is removed again.

    Raises LockError at once when another process holds it, OutputError when the folder cannot be
    written; `flag` (e.g. "--workdir") names where the folder came from in those messages.
    """
    with output_dir(folder, flag) as made, _locked(made, what, flag) as path:
        yield path


@contextlib.contextmanager
def _locked(folder: Path, what: str, flag: str) -> Iterator[Path]:
    path = folder / LOCK_NAME
    where = f"{folder}" + (f" ({flag})" if flag else "")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{where}: cannot create the lock file {path.name}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise LockError(f"{where}: in use by {_holder(path)}; wait for it to finish or stop it") from None
            raise
        # The previous holder unlinks the file before unlocking; a lock on an unlinked file is no lock.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(info) + "\n").encode())
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # releases the flock
