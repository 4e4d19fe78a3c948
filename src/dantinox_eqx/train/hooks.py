"""The loop's hooks: evaluation, checkpointing, reporting, each with its own interval.

A hook is called after a step when it is `due`: by default every `every` steps and at the last
step. Hooks run in list order and share a `StepEvent` (the step's metrics; the evaluation row
once the evaluation has run; whether training stops early; whether the latest checkpoint was
saved). They return the `TrainState`, changed or not. The order `fit` uses, and why:

    Timer        starts the clock after the first step (its compilation is not timed)
    ProgressBar  advances the bar
    Evaluate     every eval_interval: losses, the log row, the best checkpoint, early stopping
    Checkpoint   every checkpoint_interval, at every evaluation, at the end: latest + cursor
    Report       after an evaluation: print the row, call the loggers, restart the clock

so at an evaluation the files are written in the order log row, best checkpoint, latest
checkpoint, cursor: a kill at any point leaves a resumable directory (the latest checkpoint
holds the early-stopping counters, and rows past it are dropped on resume).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ..config import Config
from ..run import checkpoint as ckpt
from ..run.layout import write_cursor, write_log
from .progress import Progress, TrainingDiverged
from .state import TrainState

__all__ = ["StepEvent", "Hook", "Clock", "Checkpointer", "Timer", "ProgressBar", "Evaluate", "Checkpoint",
           "Report", "all_finite"]

Logger = Callable[[dict[str, Any]], Any]


@dataclasses.dataclass
class StepEvent:
    """What the hooks of one step share (host-side, mutable for the step's hooks only)."""

    step: int  # optimizer updates done, this step's included
    total: int
    metrics: Any  # the step's metrics, on the device (fetched only when a hook needs them)
    row: dict[str, Any] | None = None  # the evaluation row, if this step evaluated
    stop_early: bool = False
    saved: bool = False  # the latest checkpoint holds this step

    @property
    def last(self) -> bool:
        return self.step == self.total


class Hook:
    """Called after a step when `due`; returns the (possibly changed) state. A hook that never
    reads or changes the state sets `reads_state = False`: the loop then hands it whatever state
    it has, possibly a step behind, and ignores what it returns (see train/loop.py)."""

    every: int = 1
    reads_state: bool = True

    def due(self, event: StepEvent) -> bool:
        return event.step % self.every == 0 or event.last

    def __call__(self, state: TrainState, event: StepEvent) -> TrainState:
        raise NotImplementedError


@eqx.filter_jit
def all_finite(tree: Any) -> Any:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class Clock:
    """Wall time of the training steps between two evaluations (evaluating, saving and the
    first step's compilation excluded)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.from_step = 0

    def restart(self, step: int) -> None:
        self.started, self.from_step = time.perf_counter(), step

    def ms_per_step(self, step: int) -> float:
        return 1000.0 * (time.perf_counter() - self.started) / max(step - self.from_step, 1)


class Checkpointer:
    """Saves the run's checkpoints and cursor (every process calls it: orbax saves
    collectively; only `primary` writes the cursor) and refuses to save non-finite state."""

    def __init__(self, run_dir: Path, mesh: Any, total: int, data_path: Path, *, primary: bool,
                 saved: Callable[[Any], Any] = lambda p: p, keep: int = 2,
                 on_disk: Callable[[TrainState], TrainState] = lambda s: s):
        self.run_dir, self.mesh, self.total, self.data_path, self.keep = run_dir, mesh, total, data_path, keep
        self.primary = primary
        self.saved = saved  # what of the params is saved (an adapter-only LoRA run: the adapters)
        self.on_disk = on_disk  # the state in the checkpoints' form (layer_layout.restack_state)

    def check_finite(self, step: int, params: Any, losses: dict[str, float], finite: bool | None = None) -> None:
        """Raise TrainingDiverged on a non-finite loss or parameter (`finite`: the parameters'
        check when already computed, as the evaluation does)."""
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if bad or not (bool(all_finite(params)) if finite is None else finite):
            what = ", ".join(f"{k}={v}" for k, v in bad.items()) or "non-finite parameters"
            last = ckpt.latest_step(self.run_dir, ckpt.LATEST)
            kept = (f"the last good checkpoint (step {last}) in {str(self.run_dir)!r} is intact"
                    if last is not None else f"no checkpoint was saved in {str(self.run_dir)!r}")
            raise TrainingDiverged(f"training diverged at step {step} ({what}); {kept}; "
                                   "lower lr, raise warmup_steps or set grad_clip")

    def save_best(self, state: TrainState) -> None:
        params = self.on_disk(state.replace(opt_state=None)).params  # best keeps no optimizer state
        ckpt.save(self.run_dir, ckpt.BEST, state.step, self.saved(params))

    def save_latest(self, state: TrainState, *, finished: bool = False, stopped_early: bool = False) -> None:
        disk = self.on_disk(state)
        ckpt.save(self.run_dir, ckpt.LATEST, state.step, self.saved(disk.params), disk.checkpoint_tree(self.mesh),
                  keep=self.keep)  # the last `keep` latest checkpoints: a fallback if one fails its check
        if self.primary:
            best = state.best_val_loss
            write_cursor(self.run_dir, {
                "step": state.step, "total_steps": self.total, "best_val_loss": None if math.isinf(best) else best,
                "best_step": state.best_step, "evals_without_improvement": state.evals_without_improvement,
                "finished": finished, "stopped_early": stopped_early,
                "data_path": str(Path(self.data_path).absolute())})


class Timer(Hook):
    """Starts the clock once the first step of this session has run (compiled and finished)."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def due(self, event: StepEvent) -> bool:
        return self.clock.started is None

    def __call__(self, state: TrainState, event: StepEvent) -> TrainState:
        jax.block_until_ready(event.metrics)
        self.clock.restart(event.step)
        return state


class ProgressBar(Hook):
    reads_state = False  # called every step: it only advances the bar

    def __init__(self, progress: Progress):
        self.progress = progress

    def __call__(self, state: TrainState, event: StepEvent) -> TrainState:
        self.progress.advance()
        return state


class Evaluate(Hook):
    """Losses (and bits per byte) on `eval_iters` batches of each split, the log row (appended to
    `rows`, the log rewritten), the best checkpoint when val_loss improved, early stopping.

    `evaluate(params, step)` -> (train metrics, val metrics, params finite, MoE expert counts).
    """

    def __init__(self, config: Config, evaluate: Callable, schedule: Callable, clock: Clock,
                 checkpointer: Checkpointer, rows: list[dict[str, Any]], log_path: Path, *,
                 primary: bool, bits_per_nat: dict[str, float], experts: Any = None):
        self.every, self.patience, self.tokens_per_step = config.eval_interval, config.patience, config.tokens_per_step
        self.evaluate, self.schedule, self.clock, self.checkpointer = evaluate, schedule, clock, checkpointer
        self.rows, self.log_path, self.primary, self.experts = rows, log_path, primary, experts
        self.bits_per_nat = bits_per_nat  # per split: tokens per byte / ln 2 (loss -> bits per byte)

    def __call__(self, state: TrainState, event: StepEvent) -> TrainState:
        step = event.step
        jax.block_until_ready(event.metrics)
        ms = self.clock.ms_per_step(step)
        tr, va, finite, counts = jax.device_get(self.evaluate(state.params, step))
        losses = {"train_loss": float(tr["loss"]), "val_loss": float(va["loss"]),
                  "train_bal": float(tr["bal"]), "val_bal": float(va["bal"]),
                  "train_bpb": float(tr["loss"]) * self.bits_per_nat["train"],
                  "val_bpb": float(va["loss"]) * self.bits_per_nat["val"]}
        self.checkpointer.check_finite(step, state.params, {"step_loss": float(event.metrics["loss"]), **losses},
                                       bool(finite))
        row = {"step": step, **losses, "lr": float(self.schedule(step - 1)), "ms_per_step": ms,
               "tokens_per_s": self.tokens_per_step / (ms / 1000.0)}
        self.rows.append(row)
        if self.primary:
            write_log(self.log_path, self.rows)
            if self.experts is not None:
                self.experts.record(step, counts)
        if row["val_loss"] < state.best_val_loss:
            state = state.replace(best_val_loss=row["val_loss"], best_step=step, evals_without_improvement=0)
            self.checkpointer.save_best(state)
        else:
            state = state.replace(evals_without_improvement=state.evals_without_improvement + 1)
        event.row = row
        event.stop_early = self.patience > 0 and state.evals_without_improvement >= self.patience
        return state


class Checkpoint(Hook):
    """The latest checkpoint and the cursor: every `every` steps, at every evaluation, at the
    end and when stopping early."""

    def __init__(self, every: int, checkpointer: Checkpointer):
        self.every, self.checkpointer = every, checkpointer

    def due(self, event: StepEvent) -> bool:
        return super().due(event) or event.row is not None or event.stop_early

    def __call__(self, state: TrainState, event: StepEvent) -> TrainState:
        if event.row is None:  # an evaluation checked the parameters already
            self.checkpointer.check_finite(event.step, state.params, {})
        self.checkpointer.save_latest(state, finished=event.last or event.stop_early, stopped_early=event.stop_early)
        event.saved = True
        return state


class Report(Hook):
    """After an evaluation: the row on the console and to every logger (W&B's included), the
    early-stopping message, and the clock restarted (so saving is not counted as training)."""

    def __init__(self, progress: Progress, loggers: list[Logger], clock: Clock):
        self.progress, self.loggers, self.clock = progress, loggers, clock

    def due(self, event: StepEvent) -> bool:
        return event.row is not None

    def __call__(self, state: TrainState, event: StepEvent) -> TrainState:
        self.progress.row(event.row, event.total)
        for logger in self.loggers:
            logger(dict(event.row))
        self.clock.restart(event.step)
        if event.stop_early:
            self.progress.message(f"early stop at step {event.step}: val_loss has not improved for "
                                  f"{state.evals_without_improvement} evaluations (best "
                                  f"{state.best_val_loss:.4f} at step {state.best_step})")
        return state
