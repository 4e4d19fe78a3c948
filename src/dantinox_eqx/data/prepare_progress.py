"""The progress report of `prepare` (data/prepare.py): a rich bar (MB, MB/s, ETA) on a
terminal, plain lines otherwise, nothing when disabled; on stderr."""

from __future__ import annotations

import sys
import time

__all__ = ["PrepareProgress"]


class PrepareProgress:
    """A rich bar (MB, MB/s, ETA) on a terminal; a plain line every `every` seconds and at the
    end of each phase otherwise; nothing when disabled. Writes to stderr."""

    def __init__(self, enabled: bool | None, every: float = 10.0):
        self.quiet = enabled is False
        self.tty = not self.quiet and (sys.stderr.isatty() if enabled is None else enabled)
        self.every, self.bar = every, None

    def start(self, name: str, total: int | None, done: int = 0) -> None:
        self.name, self.total, self.done, self.first = name, total, done, done
        self.t0 = self.last = time.perf_counter()
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(TextColumn(f"[bold]{name}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                TimeRemainingColumn(), console=Console(stderr=True))
            self.task = self.bar.add_task(name, total=total, completed=done)
            self.bar.start()

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.advance(self.task, n)
        elif not self.quiet and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            self.note(self._line())

    def _line(self) -> str:
        secs = max(time.perf_counter() - self.t0, 1e-9)
        rate = (self.done - self.first) / secs
        of = f"/{self.total / 1e6:.1f}" if self.total else ""
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {time.strftime('%H:%M:%S', time.gmtime(max(self.total - self.done, 0) / rate))}"
        return f"{self.name}: {self.done / 1e6:.1f}{of} MB, {rate / 1e6:.2f} MB/s{eta}"

    def finish(self) -> float:
        """End the phase; its MB/s."""
        secs = max(time.perf_counter() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        self.total = None
        if not self.quiet and not self.tty:
            self.note(self._line() + f" in {secs:.1f} s")
        return (self.done - self.first) / secs

    def note(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)
