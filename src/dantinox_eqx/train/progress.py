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

from ..run import checkpoint as ckpt

__all__ = ["TrainingInterrupted", "TrainingDiverged", "TrainingWriteError", "StopFlag", "Progress"]


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after saving the latest checkpoint at `step`, or
    (`saved=False`) during start-up, before the first step of this session, when there was
    nothing to save: the run directory is as it was (or holds only what a resume starts from)."""

    def __init__(self, signum: int, step: int, run_dir: Path | None, saved: bool = True):
        self.signum, self.step, self.run_dir, self.saved = signum, step, run_dir, saved
        name = signal.Signals(signum).name
        if saved:
            super().__init__(f"training interrupted by {name} at step {step}; checkpoint saved in {run_dir}")
        else:
            super().__init__(f"training interrupted by {name} during start-up (before this session's first "
                             "step); nothing was lost")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell convention: 130 for SIGINT, 143 for SIGTERM


class TrainingDiverged(RuntimeError):
    """The loss (or the parameters) became NaN/inf; nothing was saved after the last good step."""


class TrainingWriteError(RuntimeError):
    """Writing the run directory failed at `step` (a full disk, permissions, ...): training
    stopped; the message names the step, the path and the checkpoint that is still intact
    (`--resume` continues from it once the cause is fixed)."""

    def __init__(self, step: int, error: OSError, run_dir: Path):
        self.step, self.error = step, error
        if isinstance(error, ckpt.CheckpointWriteError):
            what = str(error)
        else:
            where = f" {str(error.filename)!r}" if error.filename else f" in {str(run_dir)!r}"
            what = f"could not write{where} at step {step}: {error.strerror or error}"
        super().__init__(f"{what}; {ckpt.intact(run_dir)}: free space (or fix the cause), then resume "
                         "with --resume")


class StopFlag:
    """SIGINT/SIGTERM handlers that only record the signal (the loop checks it between steps).
    A second signal while stopping raises KeyboardInterrupt for an immediate exit.

    `starting=True` (fit's start-up, until the loop installs its own flag): a signal raises
    TrainingInterrupted(saved=False) at once; nothing is in flight then (every write is atomic,
    and a half-made checkpoint is cleaned up on resume)."""

    def __init__(self, starting: bool = False) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self.starting = starting
        self.step, self.run_dir = 0, None  # what a start-up interruption reports (step: resumed from)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.starting:
            raise TrainingInterrupted(signum, self.step, self.run_dir, saved=False)

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
                                TimeRemainingColumn(), refresh_per_second=4)  # its thread redraws the bar on
            # the cores the step runs on: 4 redraws/s instead of rich's 10 is smooth enough
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
                f" ({row['val_bpb']:.4f} bits/byte) | lr {row['lr']:.2e} | {row['ms_per_step']:.1f} ms/step"
                f" | {row['tokens_per_s']:.0f} tok/s")
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
