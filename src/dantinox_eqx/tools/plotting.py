"""Plots of a run directory, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import os
from pathlib import Path

from ..files import atomic_path
from ..run.layout import CONFIG_FILE, DEFAULT_LOG_FILE, LOSS_CURVE_FILE, read_log

__all__ = ["plot_loss_curve"]


def plot_loss_curve(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write train and val loss against step from `run_dir/training_log.csv` to a PNG
    (default `run_dir/loss_curve.png`), atomically. Returns the PNG's path.

    Raises FileNotFoundError when the run has no log, ValueError when the log has no rows.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..config import Config

    run_dir = Path(run_dir)
    log_name = DEFAULT_LOG_FILE
    if (run_dir / CONFIG_FILE).is_file():
        log_name = Config.from_yaml(run_dir / CONFIG_FILE).log_file
    log = run_dir / log_name
    if not log.is_file():
        raise FileNotFoundError(f"run_dir: {str(log)!r} does not exist; pass a run directory that has trained")
    rows = read_log(log)
    if not rows:
        raise ValueError(f"run_dir: {str(log)!r} has no rows yet (the first one comes at the first evaluation)")
    steps = [r["step"] for r in rows]

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, [r["train_loss"] for r in rows], label="train", marker="o", markersize=2)
    ax.plot(steps, [r["val_loss"] for r in rows], label="val", marker="o", markersize=2)
    best = min(rows, key=lambda r: r["val_loss"])
    ax.axvline(best["step"], color="grey", linewidth=0.8, linestyle=":",
               label=f"best val {best['val_loss']:.4f} @ {best['step']}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()

    out = Path(out) if out is not None else run_dir / LOSS_CURVE_FILE
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
