"""Atomic file writes (layer 0: imports nothing of ours). Every file a run writes goes through here.

A file is written to a temporary name in its destination folder, flushed to disk, given the
mode a plain `open()` would have given it under the process's umask (a temporary file is
created 0600; without this, a colleague who can list a run could not read it), and renamed over
the destination: readers see the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_dir", "default_mode"]

_UMASK_LOCK = threading.Lock()


def default_mode(directory: bool = False) -> int:
    """The mode `open()` (0o666) or `mkdir()` (0o777) gives a new file under the current umask."""
    with _UMASK_LOCK:  # reading the umask means setting it: keep other threads out meanwhile
        umask = os.umask(0o022)
        os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an exception, the
    temporary file is synced, given the umask's mode and renamed to `path`. On an exception it
    is removed and `path` is untouched. For writers that want a file name (savefig, safetensors).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (see the module docstring)."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`, renamed to `path` when the block succeeds
    (`path` must be absent or an empty directory); removed on an exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, default_mode(directory=True))
        if path.exists():
            path.rmdir()  # empty (the caller checked); rmdir fails rather than lose anything
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
