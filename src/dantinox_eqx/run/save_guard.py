"""What keeps a checkpoint save honest when it fails: orbax's error noise held off stderr, the
failure's cause in one line, and the test-only fault seam that stops a save at a given phase
(or holds training's start-up at a given point). Used by `run/checkpoint.py`'s `save` and by the
trainer's start-up."""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["FAULT_ENV", "fault", "quiet_orbax", "cause"]

# Test-only seam: "which:step:phase:action[,...]" stops a save at a phase (see `fault`).
FAULT_ENV = "DANTINOX_EQX_TEST_FAULT"


def fault(which: str, step: int, phase: str, path: Path) -> None:
    """Test-only seam: `DANTINOX_EQX_TEST_FAULT="best:20:written:kill,latest:30:start:enospc"`
    stops the save of checkpoint `which` at `step` at `phase` (start, written, digested, moved,
    committed, pruned; see `save`) by SIGKILL (`kill`), a raised ENOSPC (`enospc`), or a file size
    limit of 4 KiB from then on that makes orbax's own writes fail (`fsize`). A fifth field
    limits it to the saves whose path contains it (`latest:10:written:kill:member_0001`: one
    member of a population).
    `startup:0:POINT:wait` holds `Trainer.fit`'s start-up at POINT (`locked`: the run directory
    locked, nothing written yet; `built`: the run's files written, the programs built, the loop
    not begun) after writing "fault: startup:0:POINT waiting" to stderr, until a signal's handler
    raises (at most 10 minutes): a test's SIGTERM then lands in start-up, never after it."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        w, s, ph, action, *where = item.strip().split(":")
        if (w, int(s), ph) != (which, step, phase) or (where and where[0] not in str(path)):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        elif action == "fsize":
            import resource  # noqa: PLC0415 (POSIX only, and only for this test seam)

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        elif action == "wait":
            os.write(2, f"fault: {which}:{step}:{phase} waiting\n".encode())
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                time.sleep(0.01)  # a signal handler that raises ends this


def _texts(error: BaseException | None) -> Iterator[str]:
    """The messages of `error` and of every exception in its cause/context chain."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield str(error)
        error = error.__cause__ or error.__context__


def _loop_closed(error: BaseException | None, tb: Any) -> bool:
    """tensorstore's late callback into the failed save's closed event loop: a RuntimeError
    "Event loop is closed" raised by asyncio itself (its traceback ends in asyncio)."""
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed") or tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "asyncio" in Path(tb.tb_frame.f_code.co_filename).parts


@contextlib.contextmanager
def quiet_orbax(path: str | os.PathLike, settle_s: float = 0.5, max_wait_s: float = 10.0) -> Iterator[None]:
    """Keep orbax's own reports of a failing save of `path` off stderr while it saves: when a
    write fails (a full disk), its writer threads log each failure with a traceback (absl), its
    abandoned asyncio tasks are logged when collected, and tensorstore's late callbacks raise
    "Event loop is closed" into sys.unraisablehook: many lines for one error, which `save`
    reports in one line (`cause`).

    Only those reports are held back: an absl or asyncio record whose message or exception
    (cause chain included) names `path` (every file orbax writes for this save is under it,
    its temporary names start with it), and an unraisable exception that names it or is
    asyncio's "Event loop is closed". Everything else (other threads' unraisable exceptions,
    the data prefetch thread's included; other absl records) reaches the hook and the handlers
    it would have reached. After a failure this waits until the held-back reports stop coming
    (none for `settle_s`, at most `max_wait_s`); on exit the unraisable hook and the absl
    logger are as they were before, and so is the asyncio logger after a save that succeeded.
    After a failure its filter stays on the asyncio logger: the abandoned tasks report when
    they are collected, which can be long after the wait (a Python caller that goes on after
    the CheckpointWriteError would see them); it drops only records naming this save's path."""
    marker, events = str(Path(path).absolute()), [0]

    def about_this_save(*texts: str) -> bool:
        return any(marker in text for text in texts)

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            error = record.exc_info[1] if record.exc_info else None
            if about_this_save(record.getMessage(), *_texts(error)):
                events[0] += 1
                return False
            return True

    absl_log, asyncio_log = logging.getLogger("absl"), logging.getLogger("asyncio")
    drop, hook = _Drop(), sys.unraisablehook

    def unraisable(info: Any) -> None:
        if about_this_save(*_texts(info.exc_value)) or _loop_closed(info.exc_value, info.exc_traceback):
            events[0] += 1
        else:
            hook(info)

    absl_log.addFilter(drop)
    asyncio_log.addFilter(drop)
    sys.unraisablehook = unraisable
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        deadline, seen, quiet_since = time.monotonic() + max_wait_s, -1, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - quiet_since < settle_s:
            gc.collect()  # abandoned tasks report their errors when collected
            if events[0] != seen:
                seen, quiet_since = events[0], time.monotonic()
            time.sleep(0.05)
        raise
    finally:
        if sys.unraisablehook is unraisable:  # not if someone else replaced it meanwhile
            sys.unraisablehook = hook
        absl_log.removeFilter(drop)
        if not failed:  # after a failure it stays for the abandoned tasks' late reports (above)
            asyncio_log.removeFilter(drop)


def cause(error: BaseException) -> str:
    """A short reason for a failed write: the OS error when there is one (orbax's tensorstore
    errors carry it as `[os_error_code='28']`), else the error's first line."""
    if isinstance(error, OSError) and error.errno:
        return f"[Errno {error.errno}] {error.strerror}" + (f": {str(error.filename)!r}" if error.filename else "")
    text = str(error).strip()
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        return f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}"
    first = text.splitlines()[0] if text else type(error).__name__
    return first if len(first) <= 300 else first[:300] + " ..."
