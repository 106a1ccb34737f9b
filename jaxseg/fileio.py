"""Atomic file writes: nothing half-written is ever left under the final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


class OutputError(RuntimeError):
    """An output folder that cannot be created or written; the message names it."""


def ensure_writable_dir(path: str | os.PathLike, flag: str = "") -> Path:
    """Create folder `path` if needed and check that a file can be written in it, before any work.

    Raises OutputError naming the folder (and `flag`, e.g. "--output") otherwise. A real write
    probe, not os.access: root passes os.access on a read-only mount.
    """
    path = Path(path)
    where = f"{path}" + (f" ({flag})" if flag else "")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{where}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=str(path))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{where}: output folder is not writable ({e.strerror or e})") from None
    return path


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, flag: str = "") -> Iterator[Path]:
    """`ensure_writable_dir` for a `with` block; a folder it created is removed again when the block
    leaves it empty (a command that failed early leaves no trace)."""
    path = Path(path)
    created = not path.exists()
    ensure_writable_dir(path, flag)
    try:
        yield path
    finally:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only succeeds when empty


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success it replaces `path`, on any error it is removed.

    `suffix` keeps writers that infer the format from the name happy (".nii.gz", ".png").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=str(path.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)
