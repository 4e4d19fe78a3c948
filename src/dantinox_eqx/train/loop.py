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
from typing import Any

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
    # The loop carries params, opt_state and step as locals and rebuilds the TrainState (an
    # Equinox Module: building one, or even a bound method of one, costs ~0.5 ms of Python)
    # only when a hook that reads it is due or training stops: per step, ~1 ms of host time
    # (3 % of the baby shape's step, on cores the step itself uses) was spent there.
    params, opt_state, step = state.params, state.opt_state, state.step
    try:
        while step < total:
            params, opt_state, metrics = step_fn(params, opt_state, step)
            step += 1
            event = StepEvent(step, total, metrics)
            for hook in hooks:
                if hook.due(event):
                    if hook.reads_state:
                        state = _synced(state, params, opt_state, step)
                        state = hook(state, event)
                        params, opt_state = state.params, state.opt_state
                    else:
                        hook(state, event)
            if event.saved:
                saved_at = step
            if event.stop_early:
                break
            if _should_stop(stop, multi, saved_at == step):
                state = _synced(state, params, opt_state, step)
                if saved_at != step:
                    checkpointer.check_finite(step, params, {})
                    checkpointer.save_latest(state)
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, step, run_dir)
    except OSError as e:
        raise TrainingWriteError(step, e, run_dir) from e
    return _synced(state, params, opt_state, step)


def _synced(state: TrainState, params: Any, opt_state: Any, step: int) -> TrainState:
    """`state` holding the loop's current params, optimizer state and step (itself if it does)."""
    if state.step == step and state.params is params and state.opt_state is opt_state:
        return state
    return state.replace(params=params, opt_state=opt_state, step=step)
