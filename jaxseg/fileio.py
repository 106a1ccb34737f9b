"""Atomic file writes, the one implementation every writer uses: nothing half-written is ever left under
the final name."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


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
def atomic_path(path: str | os.PathLike, suffix: str = "", same_name: bool = False) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success it replaces `path`, on any error it is removed.

    `suffix` keeps writers that infer the format from the name happy (".nii.gz", ".png").
    `same_name`: the temporary file has `path`'s own name, inside a temporary folder next to it (gzip
    records the file name in its header, so a .nii.gz is then byte-identical whoever writes it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = None
    if same_name:
        folder = tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=str(path.parent))
        tmp = os.path.join(folder, path.name)
    else:
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
    finally:
        if folder is not None:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def json_default(obj: Any):
    """numpy arrays and scalars, paths, sets and tuples as their JSON equivalents."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 1) -> Path:
    """`obj` as JSON (numpy values converted), ending in a newline, written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=json_default) + "\n")
