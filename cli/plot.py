"""`dantinox-eqx plot RUN_DIR`: loss_curve.png (train and val loss against step)."""

from __future__ import annotations

import click

from .common import handle_errors


@click.command()
@click.argument("run_dir", type=str)
@click.option("--out", type=str, default=None, metavar="PNG",
              help="Where to write the figure. Default: RUN_DIR/loss_curve.png.")
@handle_errors
def plot(run_dir: str, out: str | None) -> None:
    """Plot train and val loss against step from RUN_DIR/training_log.csv."""
    from dantinox_eqx.tools.plotting import plot_loss_curve

    try:
        path = plot_loss_curve(run_dir, out)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"Wrote {path}")


COMMANDS = [plot]
