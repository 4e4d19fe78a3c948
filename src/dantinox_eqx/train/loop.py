"""The training loop: step, then the hooks that are due, until the last step or a stop.

    state = train_loop(state, step_fn, hooks, total=..., checkpointer=..., stop=stop_flag)

`step_fn(params, opt_state, step) -> (params, opt_state, metrics)` is the compiled, sharded
step (train/step.py; its batch is a pure function of the seed and `step`). The loop never waits
on the device between evaluations: metrics are fetched only by the hooks that need them.

Stopping: SIGINT/SIGTERM (`stop`) ends the loop after the current step with the latest
checkpoint saved (TrainingInterrupted); a hook's early stop ends it after that step's hooks.
With several processes, all must stop at the same step (saving is collective), so they agree
(any process's signal counts) at each checkpoint, where they synchronise anyway.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from ..parallel import distributed
from .hooks import Checkpointer, Hook, StepEvent
from .progress import StopFlag, TrainingInterrupted, TrainingWriteError
from .state import TrainState

__all__ = ["train_loop"]


def _should_stop(stop: StopFlag, multi: bool, just_saved: bool) -> bool:
    if not multi:
        return stop.signum is not None
    return just_saved and distributed.any_process(stop.signum is not None)


def train_loop(state: TrainState, step_fn: Callable, hooks: list[Hook], *, total: int,
               checkpointer: Checkpointer, stop: StopFlag, run_dir: Path) -> TrainState:
    """Train from `state.step` to `total` (see the module docstring); returns the final state.
    An OSError while writing the run directory (a full disk, ...) ends it as one
    TrainingWriteError naming the step, the path and the checkpoint that is still intact."""
    multi = distributed.process_count() > 1
    saved_at = state.step
    try:
        while state.step < total:
            params, opt_state, metrics = step_fn(state.params, state.opt_state, state.step)
            state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
            event = StepEvent(state.step, total, metrics)
            for hook in hooks:
                if hook.due(event):
                    state = hook(state, event)
            if event.saved:
                saved_at = state.step
            if event.stop_early:
                break
            if _should_stop(stop, multi, saved_at == state.step):
                if saved_at != state.step:
                    checkpointer.check_finite(state.step, state.params, {})
                    checkpointer.save_latest(state)
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, state.step, run_dir)
    except OSError as e:
        raise TrainingWriteError(state.step, e, run_dir) from e
    return state
