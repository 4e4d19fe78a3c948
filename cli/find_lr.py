"""`dantinox-eqx find-lr` (the LR range test) and `dantinox-eqx plot-lr-schedule`."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import click

from cli.common import fail, handle_errors
from cli.overrides import field_options, load_config
from dantinox_eqx.config import SCHEDULES, Config, atomic_write_text


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new directory `parent/prefix_YYYYMMDD_HHMMSS` (suffixed _1, _2... if taken)."""
    stem = f"{prefix}_{datetime.now():%Y%m%d_%H%M%S}"
    path, n = parent / stem, 0
    while path.exists():
        n += 1
        path = parent / f"{stem}_{n}"
    path.mkdir(parents=True)
    return path


@click.command("find-lr")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True, help="Config YAML.")
@click.option("--data_path", required=True,
              help="Training data: any source `train` takes (text, prepared directory, folder, glob, .jsonl).")
@click.option("--min_lr", type=float, default=1e-6, show_default=True, help="LR of the first step.")
@click.option("--max_lr", type=float, default=1e-2, show_default=True, help="LR of the last step.")
@click.option("--num_steps", type=int, default=None,
              help="Steps of the exponential ramp [100]; with --population, each member's steps [300].")
@click.option("--population", type=int, default=None,
              help="Train this many LRs (log-spaced from min_lr to max_lr) side by side instead of the ramp.")
@click.option("--plot", is_flag=True, help="Write lr_finder.png and lr_finder.csv (--population: lr_population.*).")
@click.option("--out_dir", default=None, help="Where --plot writes [default: a new runs/lr_finder_<time>/].")
@field_options(exclude=("config", "data_path", "min_lr", "max_lr", "num_steps", "population", "plot", "out_dir"))
@handle_errors
def find_lr(config_path: str, data_path: str, min_lr: float, max_lr: float, num_steps: int | None,
            population: int | None, plot: bool, out_dir: str | None, **fields: str | None) -> None:
    """LR range test: train briefly with an exponentially rising LR and suggest the LR of the
    steepest loss descent, on the model `train` would start from (same tokenizer, init and
    optimizer). With --population N: N learning rates trained side by side for --num_steps
    steps in one compiled program, the best by validation loss. Changes no run. --FIELD VALUE
    options override the config."""
    from dantinox_eqx.tools.lr_plots import plot_lr_finder
    from dantinox_eqx.train.trainer import Trainer

    config = load_config(config_path, fields)
    if population is not None:  # issue 17: the population LR search
        _population(config, data_path, min_lr, max_lr, population, num_steps or 300, plot, out_dir)
        return
    num_steps = num_steps or 100
    suggested, lrs, losses = Trainer(config).find_lr(data_path, min_lr, max_lr, num_steps)
    if len(lrs) < num_steps:
        click.echo(f"Stopped after {len(lrs)} of {num_steps} steps: the loss diverged at lr={lrs[-1]:.2e}")
    click.echo(f"Suggested LR: {suggested:.2e}")
    if plot:
        folder = Path(out_dir) if out_dir else _new_dir(Path("runs"), "lr_finder")
        folder.mkdir(parents=True, exist_ok=True)
        png = plot_lr_finder(lrs, losses, suggested, folder / "lr_finder.png")
        _write_csv(folder / "lr_finder.csv", ["lr", "smoothed_loss"], zip(lrs, losses))
        click.echo(f"Wrote {png}")


def _write_csv(path: Path, header: list[str], rows: Iterable[tuple]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _population(config: Config, data_path: str, min_lr: float, max_lr: float, population: int, num_steps: int,
                plot: bool, out_dir: str | None) -> None:
    from dantinox_eqx.tools.lr_plots import plot_lr_population
    from dantinox_eqx.train.lr_finder import find_lr_population_on_path

    result = find_lr_population_on_path(config, data_path, min_lr, max_lr, population, num_steps)
    click.echo(f"{'lr':>10}  {'val_loss':>9}  {'train_loss':>10}  ({population} rates, {num_steps} steps each)")
    for lr, val, train in zip(result.lrs, result.val_loss, result.train_loss):
        click.echo(f"{lr:10.2e}  {val:9.4f}  {train:10.4f}")
    click.echo(f"Best LR: {result.best_lr:.2e}")
    if plot:
        folder = Path(out_dir) if out_dir else _new_dir(Path("runs"), "lr_population")
        folder.mkdir(parents=True, exist_ok=True)
        png = plot_lr_population(result.lrs, result.val_loss, result.train_loss, result.best_lr,
                                 folder / "lr_population.png")
        _write_csv(folder / "lr_population.csv", ["lr", "val_loss", "train_loss"],
                   zip(result.lrs, result.val_loss, result.train_loss))
        click.echo(f"Wrote {png}")


@click.command("plot-lr-schedule")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True, help="Config YAML.")
@click.option("--total_steps", type=int, default=None, help="Steps of the run [default: the config's max_steps].")
@click.option("--out", default="lr_schedule.png", show_default=True, help="PNG to write.")
@click.option("--all", "all_schedules", is_flag=True, help=f"Overlay every schedule ({', '.join(SCHEDULES)}).")
@field_options(exclude=("config", "total_steps", "out", "all"))
@handle_errors
def plot_lr_schedule(config_path: str, total_steps: int | None, out: str, all_schedules: bool,
                     **fields: str | None) -> None:
    """Plot the LR against the step for the config's schedule (warmup, then cosine / linear /
    constant / wsd). --FIELD VALUE options override the config (e.g. --lr_schedule wsd)."""
    from dantinox_eqx.tools.lr_plots import plot_lr_schedule as plot

    config = load_config(config_path, fields)
    if total_steps is None:
        if config.max_steps is None:
            fail("--total_steps: the config sets no max_steps (its step count depends on the corpus); "
                 "pass --total_steps N")
        total_steps = config.max_steps
    png = plot(config, total_steps, out, schedules=SCHEDULES if all_schedules else None)
    click.echo(f"Wrote {png}")


COMMANDS = [find_lr, plot_lr_schedule]
