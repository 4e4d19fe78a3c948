"""W&B logging in offline mode (no network, no account): what wandb writes, read back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dantinox_eqx.config import Config
from dantinox_eqx.train.wandb_logger import (
    METRICS_FILE,
    WandbLogger,
    make_wandb_logger,
    read_metrics_file,
    read_wandb_file,
)

from .conftest import TINY

ROWS = [{"step": 50, "train_loss": np.float32(3.25), "val_loss": 3.5, "train_bal": 0.0, "val_bal": 0.0,
         "lr": 1e-3, "ms_per_step": 12.5, "tokens_per_s": 5120.0},
        {"step": 100, "train_loss": 2.75, "val_loss": np.float64(2.875), "train_bal": 0.0, "val_bal": 0.0,
         "lr": 9e-4, "ms_per_step": 12.0, "tokens_per_s": 5333.0}]
SUMMARY = {"n_params": 12345, "n_trainable": 12345, "dtype": "float32"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _run_files(run_dir):
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.mark.slow
def test_offline_run_writes_the_rows_config_and_summary(tmp_path):
    config = Config(**TINY).replace(wandb=True)
    logger = make_wandb_logger(config, tmp_path / "run")
    assert isinstance(logger, WandbLogger) and logger.project == "dantinox-eqx"
    logger.start(config, SUMMARY)
    for row in ROWS:
        logger(row)
    logger.finish()

    (run_file,) = _run_files(tmp_path / "run")
    assert (run_file.parent / "logs" / "debug.log").is_file()
    logged = read_wandb_file(run_file)
    history = [{k: h[k] for k in ("_step", "val_loss", "train_loss", "lr")} for h in logged["history"]]
    assert history == [{"_step": 50, "val_loss": 3.5, "train_loss": 3.25, "lr": 1e-3},
                       {"_step": 100, "val_loss": 2.875, "train_loss": 2.75, "lr": 9e-4}]
    assert logged["summary"]["val_loss"] == 2.875  # the last value, as W&B's summary holds it
    assert logged["summary"]["model/n_params"] == 12345
    assert {k: logged["config"][k] for k in ("dim", "lr", "num_blocks", "wandb")} == \
        {"dim": 32, "lr": 3e-3, "num_blocks": 2, "wandb": True}
    assert logged["config"]["model_summary"] == SUMMARY
    # our own copy of every row, readable without wandb
    rows = read_metrics_file(tmp_path / "run" / METRICS_FILE)
    assert [r["val_loss"] for r in rows] == [3.5, 2.875] and rows[0]["step"] == 50
    assert json.loads((tmp_path / "run" / "wandb_run.json").read_text())["id"] in run_file.name


def test_wandb_is_off_unless_asked(tmp_path):
    assert make_wandb_logger(Config(**TINY), tmp_path) is None
    logger = make_wandb_logger(Config(**TINY).replace(wandb_project="mine"), tmp_path)
    assert logger is not None and logger.project == "mine"


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    config = Config(**TINY).replace(wandb=True)
    first = make_wandb_logger(config, tmp_path)
    first.start(config, SUMMARY)
    first(ROWS[0])
    first.finish()
    second = make_wandb_logger(config, tmp_path)  # the Trainer resuming the run
    second.start(config, SUMMARY)
    second(ROWS[1])
    second.finish()
    files = _run_files(tmp_path)
    assert len(files) == 2 and files[0].name == files[1].name  # same run id: `wandb sync` merges them
    assert [h["val_loss"] for f in files for h in read_wandb_file(f)["history"]] == [3.5, 2.875]
    assert [r["step"] for r in read_metrics_file(tmp_path / METRICS_FILE)] == [50, 100]


def test_logger_joins_an_active_run_and_leaves_it_open(tmp_path):
    import wandb

    run = wandb.init(project="p", dir=str(tmp_path), config={"lr": 0.5})  # e.g. a sweep agent's run
    try:
        logger = WandbLogger("p", Config(**TINY), tmp_path / "trial")
        logger.start(Config(**TINY), SUMMARY)
        assert logger.run is run and not logger.owns_run
        assert run.config["lr"] == 0.5  # the sweep's value is not overwritten by the config's
        logger(ROWS[0])
        logger.finish()
        assert wandb.run is run  # still open for its owner
    finally:
        run.finish()
        wandb.teardown()
    (run_file,) = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert [h["val_loss"] for h in read_wandb_file(run_file)["history"]] == [3.5]


def test_reader_follows_records_across_blocks(tmp_path):
    # > 32 KiB of history: records span the log's 32 KiB blocks (FIRST/MIDDLE/LAST chunks).
    config = Config(**TINY).replace(wandb=True)
    logger = make_wandb_logger(config, tmp_path)
    logger.start(config, {"note": "x" * 40_000})  # one record larger than a block
    for step in range(300):
        logger({"step": step, "val_loss": 1.0 + step / 1000, **{f"m{i}": float(i) for i in range(10)}})
    logger.finish()
    (run_file,) = _run_files(tmp_path)
    assert run_file.stat().st_size > 3 * 32768
    logged = read_wandb_file(run_file)
    assert [h["_step"] for h in logged["history"]] == list(range(300))
    np.testing.assert_allclose([h["val_loss"] for h in logged["history"]], 1.0 + np.arange(300) / 1000)
    assert logged["config"]["model_summary"]["note"] == "x" * 40_000
