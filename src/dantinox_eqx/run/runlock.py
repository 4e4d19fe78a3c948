"""One writer per run directory: `RunLock(run_dir)`, an OS-level lock on `run_dir/run.lock`.

    with RunLock(run_dir):        # RunLockedError (a ConfigError: exit code 2) if another
        ...train...               # process holds it, naming that process's pid and host

The lock is `fcntl.flock` on the open file `run.lock`: the kernel drops it when the process
ends, however it ends (a kill -9 included), so a dead holder never leaves the run locked and
the next writer simply takes it over. The file holds the holder's pid and host (JSON), only to
name it in the refusal; it is never deleted (deleting a lock file races with a process that has
just opened it). Under multi-process JAX only process 0 locks.

Taking the lock and recording the holder are two steps: `acquire(record=False)` takes the lock
without writing the file, and `record()` writes the pid and host once the run is accepted (its
inputs checked), so a command refused after locking (e.g. a resume with another model shape)
leaves the run directory byte-identical. `acquire()` does both. A process refused while the
holder is still starting (locked, not yet recorded) is told so rather than given the previous,
dead holder's pid.

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


def _describe(who: dict[str, Any]) -> str:
    """The refusal's words for the holder `who` (`holder`): its pid and host, unless the file
    names nobody, or a process of this host that is gone: then the holder locked without
    recording itself yet (a run still checking its inputs), and the file names an earlier writer."""
    pid, host = who.get("pid"), who.get("host")
    if not who:  # a new run's lock file, not written yet
        return "a process still starting up, not yet recorded in run.lock"
    if host == socket.gethostname() and isinstance(pid, int) and pid > 0 and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "a process still starting up, not yet recorded in run.lock"
        except PermissionError:
            pass  # alive, another user's
    return f"process {pid if pid is not None else '?'} on host {host if host is not None else '?'}"


class RunLock:
    """An exclusive lock on `run_dir` (which must exist) for this process; see the module doc."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, record: bool = True) -> RunLock:
        """Take the lock (a no-op if this object holds it); RunLockedError if another holds it.
        `record`: also write this process's pid and host into the file (`record()`)."""
        if self._fd is not None:
            if record:
                self.record()
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
            raise RunLockedError(f"run_dir: {str(self.run_dir)!r} is in use by another training run "
                                 f"({_describe(holder(self.run_dir))}); wait for it to finish or stop it, "
                                 "or choose another --run_dir") from None
        self._fd = fd
        if record:
            self.record()
        return self

    def record(self) -> None:
        """Write this process's pid and host into the held lock's file (left as it is when it
        says so already: a resume by the process that wrote it changes nothing)."""
        if self._fd is None:
            raise RuntimeError("RunLock.record: the lock is not held")
        data = (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode()
        if os.pread(self._fd, len(data) + 1, 0) != data:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Drop the lock (closing the file releases it); the file stays."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
