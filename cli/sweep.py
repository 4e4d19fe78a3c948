"""`dantinox-eqx sweep`: a hyperparameter sweep on a W&B server, or offline with optuna."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from cli.common import fail, handle_errors
from cli.overrides import field_options, load_config


@click.command("sweep")
@click.option("--sweep_config", required=True, type=click.Path(dir_okay=False), help="W&B-format sweep YAML.")
@click.option("--data_path", required=True,
              help="Training data: any source `train` takes (text, prepared directory, folder, glob, .jsonl).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Base config YAML the trials' values override [default: the --init_from run's config.yaml, "
                   "else the library defaults].")
@click.option("--wandb_project", default="dantinox-eqx", show_default=True, help="W&B project (wandb backend).")
@click.option("--entity", default=None, help="W&B entity (wandb backend).")
@click.option("--count", type=int, default=10, show_default=True, help="Trials to run now.")
@click.option("--backend", type=click.Choice(["wandb", "local", "population"]), default="wandb", show_default=True,
              help="wandb: a W&B sweep agent (needs a server); local: optuna, offline, one run after another; "
                   "population: optuna, offline, the trials of one shape trained together in one program.")
@click.option("--population", type=int, default=None,
              help="population backend: at most this many trials trained at once [default: all of a shape].")
@click.option("--sweep_dir", default=None, help="Sweep directory; an existing one is continued "
              "[default: a new runs/sweep_<time>/].")
@click.option("--sweep_id", default=None, help="wandb backend: join this existing W&B sweep.")
@click.option("--seed", type=int, default=None, help="Sampler seed (local backend) [default: the config's].")
@field_options(exclude=("sweep_config", "data_path", "config", "wandb_project", "entity", "count", "backend",
                        "population", "sweep_dir", "sweep_id", "seed"))
@handle_errors
def sweep(sweep_config: str, data_path: str, config_path: str | None, wandb_project: str,
          entity: str | None, count: int, backend: str, population: int | None, sweep_dir: str | None,
          sweep_id: str | None, seed: int | None, **fields: str | None) -> None:
    """Run COUNT trials of a sweep; each trains the base config with the trial's values and
    reports the sweep's metric. Writes sweep_results.csv (best first) and sweep.png.
    --FIELD VALUE options override the base config (e.g. --max_steps 300)."""
    from dantinox_eqx.tools import sweep as sw

    spec = sw.load_sweep_config(sweep_config)  # every check before anything runs
    base = load_config(config_path, fields)
    folder = Path(sweep_dir) if sweep_dir else Path("runs") / f"sweep_{datetime.now():%Y%m%d_%H%M%S}"
    earlier = {r["trial"] for r in sw.read_records(folder)}  # a continued sweep's trials: not this run's
    click.echo(f"Sweep directory: {folder}")
    if population is not None and backend != "population":
        fail("--population: only --backend population trains trials together; drop it or use that backend")
    if backend == "population":  # issue 17: tools/population_sweep.py
        from dantinox_eqx.tools.population_sweep import run_population_sweep

        records = run_population_sweep(spec, base, data_path, folder, count, population=population, seed=seed,
                                       log=click.echo)
    elif backend == "local":
        records = sw.run_local_sweep(spec, base, data_path, folder, count, sw.trainer_train_fn, seed=seed,
                                     log=click.echo)
    else:
        records = sw.run_wandb_sweep(spec, base, data_path, folder, count, sw.trainer_train_fn,
                                     project=wandb_project, entity=entity, sweep_id=sweep_id, log=click.echo)
    done = [r for r in records if r["status"] == "complete"]
    click.echo(f"Results: {folder / 'sweep_results.csv'} ({len(done)} of {len(records)} trials complete)")
    if done:
        best = done[0]
        click.echo(f"Best: trial {best['trial']} {spec.metric}={best['metric']:.6g} ({folder / best['run_dir']})")
    failed = sw.failed_trials(records, since=earlier)
    if failed:  # exit 1: a failure is a bug or a broken setup to look at, even when other trials completed
        where = ", ".join(str(folder / r["error_file"]) for r in failed if r.get("error_file"))
        numbers = ", ".join(str(r["trial"]) for r in failed)
        raise click.ClickException(f"{len(failed)} trial(s) failed (trial {numbers}); their tracebacks: {where}")
    if not done:
        raise click.ClickException("no trial completed; see the reasons in sweep_results.csv")


COMMANDS = [sweep]
