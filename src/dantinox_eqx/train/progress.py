"""What the loop shows and hears: the progress display, SIGINT/SIGTERM, and how training ends.

`Progress` is a rich bar on a terminal and one printed line per evaluation otherwise (nothing in
the non-primary processes of a multi-process run). `StopFlag` records SIGINT/SIGTERM so the
loop can stop between steps and save; `TrainingInterrupted` and `TrainingDiverged` are how a
`fit` ends early.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["TrainingInterrupted", "TrainingDiverged", "StopFlag", "Progress"]


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after saving the latest checkpoint at `step`."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        name = signal.Signals(signum).name
        super().__init__(f"training interrupted by {name} at step {step}; checkpoint saved in {run_dir}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell convention: 130 for SIGINT, 143 for SIGTERM


class TrainingDiverged(RuntimeError):
    """The loss (or the parameters) became NaN/inf; nothing was saved after the last good step."""


class StopFlag:
    """SIGINT/SIGTERM handlers that only record the signal (the loop checks it between steps).
    A second signal while stopping raises KeyboardInterrupt for an immediate exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Progress:
    """A rich progress bar on a terminal; one printed line per evaluation otherwise; nothing
    at all when `quiet` (the non-primary processes of a multi-process run)."""

    def __init__(self, total: int, start: int, enabled: bool | None = None, quiet: bool = False):
        self.tty = (sys.stdout.isatty() if enabled is None else enabled) and not quiet
        self.quiet = quiet
        self.bar = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  "
                                           "{task.fields[tps]} tok/s"),
                                TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-")
            self.bar.start()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def row(self, row: dict[str, Any], total: int, prefix: str = "") -> None:
        """Print an evaluation row (`prefix`: e.g. which member of a population it belongs to)."""
        if self.quiet:
            return
        line = (f"{prefix}step {row['step']}/{total} | train {row['train_loss']:.4f} | val {row['val_loss']:.4f}"
                f" | lr {row['lr']:.2e} | {row['ms_per_step']:.1f} ms/step | {row['tokens_per_s']:.0f} tok/s")
        if self.bar is not None:
            self.bar.update(self.task, loss=f"{row['train_loss']:.4f}", lr=f"{row['lr']:.2e}",
                            tps=f"{row['tokens_per_s']:.0f}")
            self.bar.console.print(line, highlight=False)
        else:
            print(line, flush=True)

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
