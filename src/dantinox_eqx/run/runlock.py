"""One writer per run directory: `RunLock(run_dir)`, an OS-level lock on `run_dir/run.lock`.

    with RunLock(run_dir):        # RunLockedError (a ConfigError: exit code 2) if another
        ...train...               # process holds it, naming that process's pid and host

The lock is `fcntl.flock` on the open file `run.lock`: the kernel drops it when the process
ends, however it ends (a kill -9 included), so a dead holder never leaves the run locked and
the next writer simply takes it over. The file holds the holder's pid and host (JSON), only to
name it in the refusal, and is rewritten only when they change (a refused resume in the same
process leaves the run directory untouched); it is never deleted (deleting a lock file races
with a process that has just opened it). Under multi-process JAX only process 0 locks.

flock works between the processes of one machine and, on Linux, over NFS too (the client
emulates it with byte-range locks on the whole file, see flock(2)); other network file systems
need locking enabled (Lustre: mount -o flock). Where locking is unsupported, `acquire` fails
with a ConfigError saying so. The lock's file descriptor is not inherited by child processes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from ..config import ConfigError

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "holder"]

LOCK_FILE = "run.lock"


class RunLockedError(ConfigError):
    """Another process is writing this run directory (the message names its pid and host)."""


def holder(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What `run_dir/run.lock` says about its (last) holder: {"pid", "host"}, or {}."""
    try:
        data = json.loads((Path(run_dir) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """An exclusive lock on `run_dir` (which must exist) for this process; see the module doc."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock (a no-op if this object holds it); RunLockedError if another holds it."""
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"run_dir: cannot create the lock file {str(self.path)!r}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"run_dir: cannot lock {str(self.path)!r} ({e.strerror}); the file "
                                  "system must support file locks") from None
            who = holder(self.run_dir)
            raise RunLockedError(f"run_dir: {str(self.run_dir)!r} is in use by another training run (process "
                                 f"{who.get('pid', '?')} on host {who.get('host', '?')}); wait for it to finish "
                                 "or stop it, or choose another --run_dir") from None
        record = (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode()
        if os.pread(fd, len(record) + 1, 0) != record:  # unchanged when this process held it before
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the file releases it); the file stays."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
