"""The training loop's own host time per step, without a device step: `train_loop` with a step
function that returns its inputs, and fit's per-step hooks (Timer, ProgressBar with the bar on
or off; Evaluate / Checkpoint / Report stand-ins never due). Measures what the loop adds to
every step, free of the step's own noise; run it on two checkouts to compare:

    PYTHONPATH=src python benchmarks/loop_host.py [--steps 3000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from dantinox_eqx.train.hooks import Clock, Hook, ProgressBar, Timer
from dantinox_eqx.train.loop import train_loop
from dantinox_eqx.train.progress import Progress, StopFlag
from dantinox_eqx.train.state import TrainState


class Never(Hook):
    every = 10**9

    def due(self, event) -> bool:
        return False


def per_step_us(steps: int, bar: bool) -> float:
    params = {f"w{i}": jnp.ones((4,)) for i in range(50)}  # the baby model has ~50 arrays
    opt = {"mu": params, "nu": params}
    metrics = {"loss": jnp.zeros(()), "bal": jnp.zeros(()), "grad_norm": jnp.zeros(())}
    step_fn = lambda p, o, s: (p, o, metrics)
    progress = Progress(steps, 0, enabled=bar)
    hooks = [Timer(Clock()), ProgressBar(progress), Never(), Never(), Never()]
    state = TrainState.initial(params, opt, key=jax.random.key(0))
    t = time.perf_counter()
    train_loop(state, step_fn, hooks, total=steps, checkpointer=None, stop=StopFlag(), run_dir=Path("."))
    dt = time.perf_counter() - t
    progress.close()
    return 1e6 * dt / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    a = ap.parse_args()
    print(json.dumps({"loop_host_us_per_step": round(min(per_step_us(a.steps, False) for _ in range(3)), 1),
                      "loop_host_us_per_step_bar": round(min(per_step_us(a.steps, True) for _ in range(3)), 1)}))


if __name__ == "__main__":
    main()
