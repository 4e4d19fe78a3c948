"""Sweeps: YAML validation, the GQA shape rule, the local optuna backend (resume, grid, failures),
and the W&B backend's trial path driven by a stand-in agent (a real one needs a W&B server)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.image as mpimg
import numpy as np
import optuna
import pytest
import yaml

from dantinox_eqx.config import Config, ConfigError
from dantinox_eqx.data.sampling import sample_batch
from dantinox_eqx.model import Transformer
from dantinox_eqx.tools import sweep as sw
from dantinox_eqx.tools.sweep_config import build_trial_config, load_sweep_config, parse_sweep_config
from dantinox_eqx.train.lr_finder import prepare_config_data
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, make_eval_step, make_train_step

from .conftest import ROOT, TINY

BASE = dict(TINY, vocab_size=None)  # dim 32 = 4 heads x 8


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "sweep_results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _spec(**over) -> dict:
    spec = {"method": "random", "metric": {"name": "val_loss", "goal": "minimize"},
            "parameters": {"lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1}}}
    spec.update(over)
    return spec


def fake_loss(config: Config) -> float:
    return (math.log10(config.lr) - math.log10(3e-3)) ** 2 + abs(config.dim - 64) / 64 + 1.0


def fake_train(config: Config, data_path: str, run_dir: Path) -> dict[str, float]:
    """A stand-in training: a known function of the config (minimum at lr = 3e-3, dim 64)."""
    run_dir.mkdir(parents=True)
    config.to_yaml(run_dir / "config.yaml")
    return {"val_loss": fake_loss(config), "train_loss": fake_loss(config) - 0.1}


def tiny_train(config: Config, data_path: str, run_dir: Path) -> dict[str, float]:
    """A real short training with the pure step; writes a run dir like the Trainer's."""
    data = prepare_config_data(config, data_path)
    config = config.replace(vocab_size=data.vocab_size)
    mkey, dkey, skey, ekey = jax.random.split(jax.random.key(config.seed), 4)
    params, static = eqx.partition(Transformer(config, key=mkey), eqx.is_array)
    opt = make_optimizer(config, config.max_steps)
    state = init_opt_state(opt, params)
    step, evaluate = make_train_step(static, opt), make_eval_step(static)
    train, val = jnp.asarray(data.train), jnp.asarray(data.val)
    for s in range(config.max_steps):
        batch = sample_batch(train, jax.random.fold_in(dkey, s), config.batch_size, config.max_context)
        params, state, m = step(params, state, batch, jax.random.fold_in(skey, s))
    val_batches = sample_batch(val, ekey, config.batch_size, config.max_context, config.eval_iters)
    val_loss = float(evaluate(params, val_batches)["loss"])
    run_dir.mkdir(parents=True)
    config.to_yaml(run_dir / "config.yaml")
    (run_dir / "training_log.csv").write_text(
        "step,train_loss,val_loss,train_bal,val_bal,lr,ms_per_step,tokens_per_s\n"
        f"{config.max_steps},{float(m['loss'])},{val_loss},0,0,{config.lr},1,1\n")
    return sw.metrics_from_run_dir(run_dir)


# ------------------------------------------------------------------------------ validation
def test_seed_sweep_yaml_parses():
    spec = load_sweep_config(ROOT / "configs" / "sweep.yaml")
    assert (spec.method, spec.metric, spec.goal) == ("bayes", "val_loss", "minimize")
    assert spec.parameters["lr"].distribution == "log_uniform_values"
    assert (spec.parameters["lr"].min, spec.parameters["lr"].max) == (1e-4, 5e-3)
    assert spec.parameters["dim"].values == (256, 512)
    assert len(spec.parameters) == 10


@pytest.mark.parametrize("params, message", [
    ({"lrr": {"values": [1e-3]}}, "'lrr': not a Config field; did you mean 'lr'"),
    ({"lr": {"distribution": "log_uniformm_values", "min": 1e-4, "max": 1e-2}}, "did you mean 'log_uniform_values'"),
    ({"lr": {"distribution": "uniform", "min": 1e-4}}, "needs min and max (max missing)"),
    ({"lr": {"distribution": "uniform", "min": 1e-2, "max": 1e-4}}, "min must be below max"),
    ({"lr": {"distribution": "log_uniform_values", "min": 0, "max": 1e-2}}, "needs min > 0"),
    ({"lr": {"distribution": "q_uniform", "min": 0.1, "max": 0.5, "q": 0}}, "q must be positive"),
    ({"lr": {"distribution": "uniform", "min": 1e-4, "max": 1e-2, "q": 1e-4}}, "q only applies"),
    ({"lr": {"distribution": "normal", "mu": 0.1, "sigma": -1}}, "sigma must be positive"),
    ({"batch_size": {"distribution": "uniform", "min": 8, "max": 64.5}}, "integer field"),
    ({"optimizer": {"distribution": "uniform", "min": 0, "max": 1}}, "a str field takes values"),
    ({"optimizer": {"values": ["adamw", "adamx"]}}, "value 'adamx' is invalid"),
    ({"lr": {"values": []}}, "non-empty list"),
    ({"lr": {"vals": [1e-3]}}, "unknown key 'vals'"),
    ({"lr": {"min": "abc", "max": 1}}, "min must be a number"),
    ({"lr": {"distribution": "uniform", "min": -1.0, "max": 1e-2}}, "lr: must be positive"),
    ({"dim": {"values": [64, 48.5]}}, "expected positive integers"),
    ({"lr": 0.001}, "expected a mapping"),
])
def test_bad_parameters_raise_before_any_trial(params, message, small_corpus, tmp_path):
    with pytest.raises(ConfigError, match=_re(message)):
        parse_sweep_config(_spec(parameters=params))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_spec(parameters=params)))
    with pytest.raises(ConfigError):
        load_sweep_config(path)


def _re(text: str) -> str:
    return re.escape(text)


@pytest.mark.parametrize("over, message", [
    ({"method": "bayesian"}, "did you mean 'bayes'"),
    ({"metric": {"name": "val_los", "goal": "minimize"}}, "did you mean 'val_loss'"),
    ({"metric": {"name": "val_loss", "goal": "minimise"}}, "not minimize or maximize"),
    ({"paramaters": {}}, "did you mean 'parameters'"),
    ({"parameters": {}}, "non-empty mapping"),
    ({"method": "grid"}, "method grid needs discrete values"),
    ({"run_cap": 0}, "run_cap"),
])
def test_bad_sweep_keys_raise(over, message):
    with pytest.raises(ConfigError, match=_re(message)):
        parse_sweep_config(_spec(**over))


@pytest.mark.slow
def test_cli_rejects_a_bad_sweep_before_any_trial(small_corpus, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_spec(parameters={"lrr": {"values": [1e-3]}})))
    exe = Path(sys.executable).parent / "dantinox-eqx"
    out = subprocess.run([str(exe), "sweep", "--sweep_config", str(path), "--data_path", str(small_corpus),
                          "--backend", "local", "--count", "2", "--sweep_dir", str(tmp_path / "sw")],
                         cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "did you mean 'lr'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "sw").exists()


def test_distributions_draw_what_wandb_draws():
    spec = parse_sweep_config(_spec(parameters={
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "batch_size": {"distribution": "int_uniform", "min": 2, "max": 5},
        "warmup_steps": {"distribution": "q_uniform", "min": 0, "max": 100, "q": 25},
        "dropout_rate": {"distribution": "normal", "mu": 0.3, "sigma": 0.05},
        "beta2": {"distribution": "q_log_uniform_values", "min": 0.9, "max": 0.99, "q": 0.01},
        "weight_decay": {"distribution": "log_uniform", "min": -5, "max": -1},
        "optimizer": {"values": ["adamw", "lion"]},
        "seed": {"value": 7},
    }))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    draws = [spec.sample(study.ask()) for _ in range(400)]
    col = {k: np.asarray([d[k] for d in draws]) for k in ("lr", "batch_size", "warmup_steps", "dropout_rate",
                                                        "beta2", "weight_decay")}
    assert col["lr"].min() >= 1e-4 and col["lr"].max() <= 1e-2
    assert abs(np.log10(col["lr"]).mean() + 3.0) < 0.1  # uniform in log space: mean exponent -3
    assert set(col["batch_size"].tolist()) == {2, 3, 4, 5}
    assert set(col["warmup_steps"].tolist()) <= {0, 25, 50, 75, 100} and len(set(col["warmup_steps"])) == 5
    assert abs(col["dropout_rate"].mean() - 0.3) < 0.01 and abs(col["dropout_rate"].std() - 0.05) < 0.01
    np.testing.assert_allclose(col["beta2"], np.round(col["beta2"] / 0.01) * 0.01, atol=1e-9)
    assert math.exp(-5) <= col["weight_decay"].min() and col["weight_decay"].max() <= math.exp(-1)
    assert {d["optimizer"] for d in draws} == {"adamw", "lion"} and {d["seed"] for d in draws} == {7}
    for d in draws[:20]:  # every draw builds a valid config
        assert build_trial_config(Config(**BASE), d)[0] is not None


# ------------------------------------------------------------------------------ GQA rule
@pytest.mark.parametrize("values, expect", [
    ({"dim": 64}, {"head_size": 16}),                     # dim swept -> head_size = dim // n_heads
    ({"dim": 64, "n_heads": 2}, {"head_size": 32}),
    ({"head_size": 16}, {"dim": 64}),                     # head_size swept, dim pinned -> derived
    ({"n_heads": 2, "head_size": 8}, {"dim": 16}),
    ({"dim": 64, "head_size": 8}, {"n_heads": 8}),        # dim and head_size swept -> n_heads
    ({"dim": 32, "n_heads": 2, "head_size": 16}, {}),     # consistent: nothing derived
])
def test_gqa_rule_derives(values, expect):
    config, derived, reason = build_trial_config(Config(**BASE), values)
    assert reason is None and derived == expect
    assert config.dim == config.n_heads * config.head_size
    for k, v in {**values, **expect}.items():
        assert getattr(config, k) == v


@pytest.mark.parametrize("base, values, reason", [
    ({}, {"dim": 30}, "not divisible by n_heads=4"),
    ({}, {"dim": 64, "n_heads": 4, "head_size": 8}, "all three swept"),
    ({}, {"dim": 36}, "even head_size"),                  # 36 // 4 = 9: RoPE needs it even
    ({"kv_heads": 2}, {"n_heads": 8, "dim": 64, "head_size": 8}, None),
    ({"kv_heads": 4}, {"n_heads": 6, "head_size": 8}, "multiple of kv_heads"),
])
def test_gqa_rule_skips(base, values, reason):
    config, _, why = build_trial_config(Config(**{**BASE, **base}), values)
    if reason is None:
        assert why is None and config.kv_heads == 2
    else:
        assert config is None and reason in why


# ------------------------------------------------------------------------------ local backend
@pytest.mark.slow
def test_local_sweep_resumes_and_sorts(small_corpus, tmp_path):
    spec = parse_sweep_config(_spec(method="bayes", parameters={
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
        "dim": {"values": [32, 64, 128]}}))
    sweep_dir = tmp_path / "sweep"
    logs: list[str] = []
    records = sw.run_local_sweep(spec, Config(**BASE), small_corpus, sweep_dir, 4, fake_train, log=logs.append)
    assert len(records) == 4 and len(_rows(sweep_dir)) == 4
    records = sw.run_local_sweep(spec, Config(**BASE), small_corpus, sweep_dir, 3, fake_train, log=logs.append)
    rows = _rows(sweep_dir)
    assert len(rows) == 7 and sorted(int(r["trial"]) for r in rows) == list(range(7))
    losses = [float(r["val_loss"]) for r in rows]
    assert losses == sorted(losses) and [int(r["rank"]) for r in rows] == list(range(1, 8))
    for r in rows:  # the CSV holds what the training returned for the trial's config
        cfg = Config.from_yaml(sweep_dir / r["run_dir"] / "config.yaml")
        assert float(r["val_loss"]) == pytest.approx(fake_loss(cfg))
        assert cfg.head_size == cfg.dim // 4 and float(r["lr"]) == pytest.approx(cfg.lr)
        assert json.loads((sweep_dir / "records" / f"trial_{int(r['trial']):04d}.json").read_text())["status"] \
            == "complete"
    # the resumed session continued optuna's study (7 trials) without replaying the first draws
    study = optuna.load_study(study_name=sw.STUDY_NAME, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna.journal"))))
    assert len(study.trials) == 7
    assert len({round(float(r["lr"]), 12) for r in rows}) == 7
    assert any("derived head_size=16" in line for line in logs)
    image = mpimg.imread(sweep_dir / "sweep.png")
    assert image.ndim == 3 and image.shape[0] > 200


@pytest.mark.slow
def test_local_sweep_maximize_sorts_descending(small_corpus, tmp_path):
    spec = parse_sweep_config(_spec(metric={"name": "tokens_per_s", "goal": "maximize"}))
    sw.run_local_sweep(spec, Config(**BASE), small_corpus, tmp_path / "s", 5,
                       lambda c, d, r: {"tokens_per_s": c.lr * 1000}, log=lambda m: None)
    values = [float(r["tokens_per_s"]) for r in _rows(tmp_path / "s")]
    assert len(values) == 5 and values == sorted(values, reverse=True)


def test_grid_runs_each_point_once_and_skips_bad_shapes(small_corpus, tmp_path):
    spec = parse_sweep_config(_spec(method="grid", parameters={
        "dim": {"values": [32, 36, 64]},                   # 36 -> head_size 9: odd, skipped
        "num_blocks": {"distribution": "int_uniform", "min": 1, "max": 2},
        "seed": {"value": 3}}))
    calls: list[tuple[int, int]] = []

    def train(config, data_path, run_dir):
        calls.append((config.dim, config.num_blocks))
        return fake_train(config, data_path, run_dir)

    logs: list[str] = []
    records = sw.run_local_sweep(spec, Config(**BASE), small_corpus, tmp_path / "g", 20, train, log=logs.append)
    assert len(records) == 6  # the grid has 6 points; count 20 stops when it is exhausted
    assert sorted(calls) == [(32, 1), (32, 2), (64, 1), (64, 2)]
    skipped = [r for r in _rows(tmp_path / "g") if r["status"] == "skipped"]
    assert len(skipped) == 2 and all(r["dim"] == "36" and "even head_size" in r["reason"] for r in skipped)
    assert all(r["status"] == "complete" for r in _rows(tmp_path / "g")[:4])  # completed first, sorted
    assert any("grid exhausted" in line for line in logs)
    assert sw.run_local_sweep(spec, Config(**BASE), small_corpus, tmp_path / "g", 5, train,
                              log=logs.append) and len(calls) == 4  # nothing left to run


def test_failed_and_interrupted_trials_do_not_stop_the_sweep(small_corpus, tmp_path):
    spec = parse_sweep_config(_spec())
    n = {"calls": 0}

    def flaky(config, data_path, run_dir):
        n["calls"] += 1
        if n["calls"] == 2:
            raise RuntimeError("out of memory")
        if n["calls"] == 4:
            raise KeyboardInterrupt  # the user stops the sweep during trial 3
        return fake_train(config, data_path, run_dir)

    with pytest.raises(KeyboardInterrupt):
        sw.run_local_sweep(spec, Config(**BASE), small_corpus, tmp_path / "f", 5, flaky, log=lambda m: None)
    assert not (tmp_path / "f" / ".lock").exists()
    sw.run_local_sweep(spec, Config(**BASE), small_corpus, tmp_path / "f", 2, flaky, log=lambda m: None)
    status = {int(r["trial"]): r["status"] for r in _rows(tmp_path / "f")}
    assert status == {0: "complete", 1: "failed", 2: "complete", 3: "interrupted", 4: "complete", 5: "complete"}
    failed = next(r for r in _rows(tmp_path / "f") if r["status"] == "failed")
    assert failed["reason"] == "RuntimeError: out of memory"
    # the whole traceback, down to the raising line, is in the trial's folder
    record = next(r for r in sw.read_records(tmp_path / "f") if r["status"] == "failed")
    assert record["error_file"] == "trials/trial_0001/error.txt"
    lines = (tmp_path / "f" / record["error_file"]).read_text().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and lines[-1] == "RuntimeError: out of memory"
    assert 'raise RuntimeError("out of memory")' in lines[-2]


def test_cli_exits_1_naming_the_failed_trials_and_their_tracebacks(small_corpus, tmp_path, monkeypatch):
    """A trial that raises does not stop the sweep, but the command exits 1 saying how many
    failed and where their tracebacks are, even though another trial completed; continuing the
    sweep with trials that all complete exits 0 (the earlier failure was reported then)."""
    from cli.main import app
    from click.testing import CliRunner

    calls = []

    def first_fails(config, data_path, run_dir):
        calls.append(run_dir.name)
        if len(calls) == 1:
            raise RuntimeError("a bug in the training")
        return fake_train(config, data_path, run_dir)

    monkeypatch.setattr(sw, "trainer_train_fn", first_fails)
    spec_path, base_path = tmp_path / "sweep.yaml", tmp_path / "base.yaml"
    spec_path.write_text(yaml.safe_dump(_spec()))
    Config(**BASE).to_yaml(base_path)
    args = ["sweep", "--sweep_config", str(spec_path), "--data_path", str(small_corpus), "--config", str(base_path),
            "--backend", "local", "--sweep_dir", str(tmp_path / "sw")]
    out = CliRunner().invoke(app, [*args, "--count", "2"])
    error_file = tmp_path / "sw" / "trials" / "trial_0000" / sw.ERROR_FILE
    assert out.exit_code == 1, out.output
    assert "Best: trial 1 val_loss=" in out.output
    assert out.output.strip().splitlines()[-1] == (
        f"Error: 1 trial(s) failed (trial 0); their tracebacks: {error_file}")
    assert error_file.read_text().strip().endswith("RuntimeError: a bug in the training")
    again = CliRunner().invoke(app, [*args, "--count", "1"])
    assert again.exit_code == 0, again.output
    assert calls == ["trial_0000", "trial_0001", "trial_0002"]


def test_resume_refuses_a_different_sweep(small_corpus, tmp_path):
    sw.run_local_sweep(parse_sweep_config(_spec()), Config(**BASE), small_corpus, tmp_path / "r", 1, fake_train,
                       log=lambda m: None)
    other = parse_sweep_config(_spec(method="bayes"))
    with pytest.raises(ConfigError, match="different sweep config"):
        sw.run_local_sweep(other, Config(**BASE), small_corpus, tmp_path / "r", 1, fake_train)
    with pytest.raises(ConfigError, match="different base config"):
        sw.run_local_sweep(parse_sweep_config(_spec()), Config(**BASE).replace(max_steps=5), small_corpus,
                           tmp_path / "r", 1, fake_train)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a sweep")
    with pytest.raises(ConfigError, match="not a sweep directory"):
        sw.run_local_sweep(parse_sweep_config(_spec()), Config(**BASE), small_corpus, tmp_path / "other", 1,
                           fake_train)
    assert len(_rows(tmp_path / "r")) == 1


@pytest.mark.slow
def test_local_sweep_of_real_tiny_trainings(small_corpus, tmp_path):
    spec = parse_sweep_config(_spec(method="random", parameters={
        "lr": {"distribution": "log_uniform_values", "min": 3e-4, "max": 3e-2},
        "num_blocks": {"values": [1, 2]}}))
    base = Config(**BASE).replace(max_steps=20, batch_size=8)
    sweep_dir = tmp_path / "real"
    sw.run_local_sweep(spec, base, small_corpus, sweep_dir, 4, tiny_train, log=lambda m: None)
    rows = _rows(sweep_dir)
    assert len(rows) == 4 and all(r["status"] == "complete" for r in rows)
    losses = [float(r["val_loss"]) for r in rows]
    assert losses == sorted(losses) and all(1.0 < v < 4.5 for v in losses)  # learnt below log(vocab)
    best = sweep_dir / rows[0]["run_dir"]
    assert best.is_dir() and (best / "config.yaml").is_file() and (best / "sweep_trial.json").is_file()
    sw.run_local_sweep(spec, base, small_corpus, sweep_dir, 2, tiny_train, log=lambda m: None)
    rows = _rows(sweep_dir)
    assert len(rows) == 6 and sorted(int(r["trial"]) for r in rows) == list(range(6))


# ------------------------------------------------------------------------------ W&B backend
def test_wandb_backend_trial_path_with_a_stand_in_agent(small_corpus, tmp_path, monkeypatch):
    """wandb.sweep/agent need a server; the stand-in agent does what wandb's own agent does
    (writes the trial's values to WANDB_SWEEP_PARAM_PATH, calls the function, finishes the run),
    and wandb.init runs for real in offline mode."""
    import wandb
    from wandb.sdk.lib import config_util

    from dantinox_eqx.train.wandb_logger import make_wandb_logger, read_wandb_file

    spec = parse_sweep_config(_spec(parameters={"lr": {"values": [1e-3, 1e-2]}, "dim": {"values": [64]}}))
    monkeypatch.setenv("WANDB_MODE", "online")  # lets run_wandb_sweep start; the agent goes offline
    monkeypatch.setattr(wandb, "sweep", lambda sweep, project, entity=None: "fake-sweep-id")

    def agent(sweep_id, function, count, project=None, entity=None):
        assert sweep_id == "fake-sweep-id"
        os.environ["WANDB_MODE"] = "offline"
        for lr in [1e-3, 1e-2][:count]:
            path = tmp_path / f"params-{lr}.yaml"
            config_util.save_config_file_from_dict(str(path), {"lr": {"value": lr}, "dim": {"value": 64}})
            os.environ["WANDB_SWEEP_PARAM_PATH"] = str(path)
            wandb.teardown()
            function()
            wandb.finish()
            del os.environ["WANDB_SWEEP_PARAM_PATH"]
        wandb.teardown()

    monkeypatch.setattr(wandb, "agent", agent)

    def train(config, data_path, run_dir):  # logs eval rows the way the Trainer's logger does
        assert config.wandb and config.wandb_project == "proj"
        logger = make_wandb_logger(config, run_dir)
        logger.start(config, {"n_params": 123})
        result = fake_train(config, data_path, run_dir)
        logger({"step": 10, **result})
        logger.finish()
        return result

    sweep_dir = tmp_path / "wb"
    records = sw.run_wandb_sweep(spec, Config(**BASE), small_corpus, sweep_dir, 2, train, project="proj",
                                 log=lambda m: None)
    assert [r["status"] for r in records] == ["complete", "complete"]
    assert json.loads((sweep_dir / "sweep_state.json").read_text())["sweep_id"] == "fake-sweep-id"
    for r in records:
        (run_file,) = (sweep_dir / "wandb").glob(f"offline-run-*-{r['wandb_run_id']}/run-*.wandb")
        logged = read_wandb_file(run_file)
        assert logged["config"]["lr"] == r["params"]["lr"]  # the agent's values reached the trial
        assert [h["val_loss"] for h in logged["history"]] == [pytest.approx(r["metric"])]
        assert logged["summary"]["val_loss"] == pytest.approx(r["metric"])
        assert logged["summary"]["sweep_status"] == "complete"
    assert [float(r["val_loss"]) for r in _rows(sweep_dir)] == sorted(r["metric"] for r in records)


def test_wandb_backend_needs_a_server(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ConfigError, match="--backend local"):
        sw.run_wandb_sweep(parse_sweep_config(_spec()), Config(**BASE), small_corpus, tmp_path / "w", 1,
                           fake_train, project="p")


@pytest.mark.slow
def test_cli_local_sweep_trains_with_the_trainer(small_corpus, tmp_path):
    """`dantinox-eqx sweep --backend local` end to end: each trial is a real Trainer run."""
    from dantinox_eqx.train.trainer import read_log

    spec_path, base_path = tmp_path / "sweep.yaml", tmp_path / "base.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(method="grid", parameters={"lr": {"values": [1e-3, 1e-2]}})))
    Config(**BASE).to_yaml(base_path)
    exe = Path(sys.executable).parent / "dantinox-eqx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([str(exe), "sweep", "--sweep_config", str(spec_path), "--data_path", str(small_corpus),
                          "--config", str(base_path), "--backend", "local", "--count", "2", "--sweep_dir",
                          str(tmp_path / "sw"), "--max_steps", "6", "--eval_interval", "3", "--eval_iters", "1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = _rows(tmp_path / "sw")
    assert len(rows) == 2 and all(r["status"] == "complete" for r in rows)
    assert sorted(float(r["lr"]) for r in rows) == [1e-3, 1e-2]  # the grid, each point once
    losses = [float(r["val_loss"]) for r in rows]
    assert losses == sorted(losses)
    for r in rows:  # the metric is the last logged val_loss of the trial's real run directory
        run = tmp_path / "sw" / r["run_dir"]
        log = read_log(run / "training_log.csv")
        assert [x["step"] for x in log] == [3, 6] and float(r["val_loss"]) == log[-1]["val_loss"]
        assert Config.from_yaml(run / "config.yaml").lr == float(r["lr"])
    best = rows[0]
    assert f"Best: trial {best['trial']} val_loss=" in out.stdout
    assert str(tmp_path / "sw" / best["run_dir"]) in out.stdout
