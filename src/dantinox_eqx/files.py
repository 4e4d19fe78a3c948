"""Atomic file writes: a temporary file beside the target, fsync, rename.

    atomic_write_text(path, text)              # config.yaml, logs, cursors, JSON
    atomic_write_bytes(path, data)
    atomic_write(path, lambda tmp: fig.savefig(tmp))   # a writer that wants a path of its own

A reader never sees a half-written file, and a kill at any moment leaves either the old file or
the new one (plus, at worst, a `.NAME.*.tmp` file that `remove_temp_files` deletes).

Permissions: the temporary file is created by `os.open(..., 0o666)`, so it gets exactly the mode
a plain `open(path, "w")` would give under the process's umask (0644 under umask 022, like
orbax's checkpoint files), and the rename keeps it. (`tempfile.mkstemp` creates 0600 files,
which a colleague on a shared machine could not read.) `make_dir` does the same for folders.

`sha256_file(path)`: the digest of a file's bytes, read in chunks (the one file hasher the
package uses: checkpoints' digests, prepared datasets' tokenizer.json, the token cache's name).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_path", "atomic_dir", "make_temp_dir",
           "fsync_dir", "remove_temp_files", "cache_dir", "sha256_file", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"
# `.NAME.XXXXXXXX.tmp`: ours (8 hex digits) and tempfile.mkstemp's (8 characters), which older
# versions used.
_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def sha256_file(path: str | os.PathLike, into: Any = None) -> str:
    """The sha256 (hex) of the bytes of the file `path`; `into`: a `hashlib.sha256()` object to
    feed them into (to hash more after them; it is updated), a new one by default. Reads in
    chunks, the GIL released while hashing them (hashlib.file_digest)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, (lambda: into) if into is not None else "sha256").hexdigest()


def _temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def _fresh(path: Path, create: Callable[[Path], object]) -> Path:
    """`create(tmp)` for a new temporary name beside `path` (again if the name exists)."""
    while True:
        tmp = _temp_name(path)
        try:
            create(tmp)
            return tmp
        except FileExistsError:  # 32 random bits collided: draw again
            continue


def _create_temp(path: Path) -> Path:
    """A new, empty temporary file beside `path`, mode 0o666 & ~umask (what open() gives)."""
    return _fresh(path, lambda tmp: os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path` (it exists, empty, with the
    umask's mode), then fsync it and rename it onto `path`. On any error (a full disk included)
    the temporary file is removed and `path` is left as it was. Returns `path`."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see the module docstring)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see the module docstring)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def make_temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new empty folder `parent/.name.XXXXXXXX.tmp`, mode 0o777 & ~umask (`tempfile.mkdtemp`
    would make it 0700, and the mode survives the rename that publishes it)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    return _fresh(parent / name, lambda tmp: tmp.mkdir(mode=0o777))


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that an interrupted `atomic_write*` left in `directory`
    (`.NAME.XXXXXXXX.tmp`); returns them. Only the writer of `directory` may call it."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for child in Path(directory).iterdir():
            if _TEMP_FILE.match(child.name) and child.is_file() and not child.is_symlink():
                child.unlink(missing_ok=True)
                removed.append(child)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary file beside `path` (empty, with the umask's mode) for the block to
    fill; when the block ends without an exception the file is fsynced and renamed onto `path`.
    On any error (a full disk included) it is removed and `path` is left as it was; an OSError
    without a file name gets `path` (the one line a user sees names it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:  # name the file (disk full)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary directory beside `path` (the umask's mode), renamed to `path` when
    the block succeeds (`path` must be absent or an empty directory); removed on an exception."""
    path = Path(path)
    tmp = make_temp_dir(path.parent, path.name)
    try:
        yield tmp
        if path.exists():
            path.rmdir()  # empty (the caller checked); rmdir fails rather than lose anything
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def cache_dir() -> Path:
    """Where built artifacts are cached: $DANTINOX_EQX_CACHE, else $XDG_CACHE_HOME/dantinox-eqx,
    else ~/.cache/dantinox-eqx."""
    if os.environ.get("DANTINOX_EQX_CACHE"):
        return Path(os.environ["DANTINOX_EQX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dantinox-eqx"
