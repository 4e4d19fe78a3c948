"""PNG plots of the LR range test, of LR schedules and of a sweep's progress.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot global state, no
display needed) and saved atomically: to a temporary file beside the target, then renamed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..config import SCHEDULES, Config, ConfigError
from ..files import atomic_path
from ..train.optim import make_schedule

__all__ = ["save_figure", "plot_lr_finder", "plot_lr_schedule", "schedule_values", "plot_sweep", "plot_lr_population"]


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save `fig` as PNG at `path` through a temporary file and `os.replace`; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


Floats = Sequence[float] | np.ndarray


def plot_lr_finder(lrs: Floats, losses: Floats, suggested: float,
                   path: str | os.PathLike) -> Path:
    """The smoothed loss against the LR (log x axis) with a vertical marker at `suggested`."""
    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.add_subplot()
    ax.plot(lrs, losses, color="C0", label="smoothed training loss")
    ax.axvline(suggested, color="C3", linestyle="--", label=f"suggested lr = {suggested:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("LR range test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def schedule_values(config: Config, total_steps: int, schedule: str | None = None) -> np.ndarray:
    """The LR of every step 0..total_steps-1 under `schedule` (default: the config's)."""
    if total_steps < 1:
        raise ConfigError(f"total_steps: must be positive, got {total_steps}")
    name = schedule or config.lr_schedule
    if name not in SCHEDULES:
        raise ConfigError(f"lr_schedule: unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    fn = make_schedule(name, config.lr, config.warmup_steps, total_steps, config.min_lr_ratio,
                       config.wsd_stable_fraction)
    return np.asarray(fn(np.arange(total_steps)), np.float64)


def plot_lr_schedule(config: Config, total_steps: int, path: str | os.PathLike,
                     schedules: Sequence[str] | None = None) -> Path:
    """LR against step for the config's schedule (or each name in `schedules`, overlaid)."""
    names = list(schedules) if schedules else [config.lr_schedule]
    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.add_subplot()
    steps = np.arange(total_steps)
    for i, name in enumerate(names):
        ax.plot(steps, schedule_values(config, total_steps, name), color=f"C{i}", label=name)
    if 0 < config.warmup_steps < total_steps:
        ax.axvline(config.warmup_steps, color="gray", linestyle=":", label=f"warmup = {config.warmup_steps}")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"LR schedule (lr={config.lr:g}, {total_steps} steps)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_sweep(trials: Sequence[int] | np.ndarray, values: Floats, metric: str, goal: str,
               path: str | os.PathLike) -> Path:
    """A sweep's metric per completed trial (dots) and the best so far (step line)."""
    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.add_subplot()
    order = np.argsort(np.asarray(trials))
    xs = np.asarray(trials)[order] if len(trials) else np.zeros(0)
    ys = np.asarray(values, np.float64)[order] if len(values) else np.zeros(0)
    ax.plot(xs, ys, "o", color="C0", label=metric)
    if len(ys):
        best = np.minimum.accumulate(ys) if goal == "minimize" else np.maximum.accumulate(ys)
        ax.step(xs, best, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep: {metric} ({goal})")
    if len(ys) and np.all(ys > 0) and ys.max() / ys.min() > 100:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_lr_population(lrs: Floats, val_losses: Floats, train_losses: Floats, best: float,
                       path: str | os.PathLike) -> Path:
    """`find-lr --population`: the validation loss after training (and the smoothed training
    loss of the last step) against each member's learning rate (log x axis), the best marked.
    Diverged members (inf) are left out of the lines."""
    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.add_subplot()
    lrs = np.asarray(lrs, np.float64)
    lines = ((val_losses, "C0", "validation loss"), (train_losses, "C1", "training loss (smoothed)"))
    for values, color, label in lines:
        ys = np.asarray(values, np.float64)
        ok = np.isfinite(ys)
        ax.plot(lrs[ok], ys[ok], "o-", color=color, label=label)
    ax.axvline(best, color="C3", linestyle="--", label=f"best lr = {best:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("loss after training")
    ax.set_title(f"{len(lrs)} learning rates trained side by side")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
