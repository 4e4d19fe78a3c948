"""`dantinox-eqx sweep --backend population` (tools/population_sweep.py): trials grouped by shape,
one population per group; the same results as the local backend; trial directories that the
other commands use like any run's; a sweep killed mid-population resumes exactly; bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cli.main import app
from click.testing import CliRunner

from dantinox_eqx.config import Config
from dantinox_eqx.run import checkpoint as ckpt
from dantinox_eqx.tools import sweep as sw
from dantinox_eqx.tools.population_sweep import run_population_sweep
from dantinox_eqx.tools.sweep_config import parse_sweep_config
from dantinox_eqx.train.trainer import LOG_COLUMNS, read_log

from .conftest import TINY, plays_slice

EXE = Path(sys.executable).parent / "dantinox-eqx"
TOL = 1e-5  # tests/test_population.py: member against separate run
EXACT = [c for c in LOG_COLUMNS if c not in ("ms_per_step", "tokens_per_s")]
BASE = dict(TINY, vocab_size=None, max_steps=20, eval_interval=5, eval_iters=2, warmup_steps=5, seed=3)
# lr x dim: 4 trials in 2 shapes (dim 64 derives head_size 16), 2 populations of 2.
SPEC = {"method": "grid", "metric": {"name": "val_loss", "goal": "minimize"},
        "parameters": {"lr": {"values": [1e-3, 3e-3]}, "dim": {"values": [32, 64]}}}


def _results(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "sweep_results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _log(run: Path) -> list[dict]:
    return [{k: r[k] for k in EXACT} for r in read_log(run / "training_log.csv")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("popsweep")
    corpus = plays_slice(d / "corpus.txt", 30_000)
    (d / "sweep.yaml").write_text(yaml.safe_dump(SPEC))
    Config(**BASE).to_yaml(d / "base.yaml")
    return {"dir": d, "corpus": corpus}


@pytest.fixture(scope="module")
def population_sweep(setup) -> Path:
    out = setup["dir"] / "population"
    records = run_population_sweep(parse_sweep_config(SPEC), Config(**BASE), setup["corpus"], out, 10,
                                   population=2, log=lambda m: None)
    assert [r["status"] for r in records] == ["complete"] * 4
    return out


@pytest.mark.slow
def test_population_backend_gives_the_local_backends_results(setup, population_sweep):
    local = setup["dir"] / "local"
    sw.run_local_sweep(parse_sweep_config(SPEC), Config(**BASE), setup["corpus"], local, 10, sw.trainer_train_fn,
                       log=lambda m: None)
    pop, loc = _results(population_sweep), _results(local)
    assert list(pop[0]) == list(loc[0])  # the same columns
    assert (population_sweep / "sweep.png").stat().st_size > 0
    by_trial = {r["trial"]: r for r in loc}
    for r in pop:
        other = by_trial[r["trial"]]
        assert (r["lr"], r["dim"], r["derived"], r["run_dir"]) == (other["lr"], other["dim"], other["derived"],
                                                                  other["run_dir"])
        assert abs(float(r["val_loss"]) - float(other["val_loss"])) <= TOL
        rows, alone = _log(population_sweep / r["run_dir"]), _log(local / r["run_dir"])
        assert max(abs(x[k] - y[k]) for x, y in zip(rows, alone) for k in EXACT) <= TOL
    assert [r["trial"] for r in pop] == [r["trial"] for r in loc]  # the same ranking
    records = sw.read_records(population_sweep)
    groups = {r["trial"]: tuple(r["population"]["trials"]) for r in records}
    assert len(set(groups.values())) == 2
    for r in records:  # one population per shape
        dims = {Config.from_yaml(population_sweep / "trials" / f"trial_{t:04d}" / "config.yaml").dim
                for t in r["population"]["trials"]}
        assert len(dims) == 1


@pytest.mark.slow
def test_trial_directories_work_with_every_command(setup, population_sweep, tmp_path):
    run = population_sweep / "trials" / "trial_0000"
    runner = CliRunner()
    out = runner.invoke(app, ["generate", str(run), "--prompt", "ROMEO:", "--max_new_tokens", "8"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["eval", str(run), "--data_path", str(setup["corpus"]), "--batches", "2", "--json"])
    assert out.exit_code == 0 and json.loads(out.output.strip().splitlines()[-1])["loss"] > 0, out.output
    out = runner.invoke(app, ["export", str(run), str(tmp_path / "exported")])
    assert out.exit_code == 0 and (tmp_path / "exported" / "config.yaml").is_file(), out.output
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    out = runner.invoke(app, ["train", "--run_dir", str(resumed), "--resume", "--max_steps", "25",
                              "--data_path", str(setup["corpus"])])
    assert out.exit_code == 0, out.output
    assert [r["step"] for r in read_log(resumed / "training_log.csv")] == [5, 10, 15, 20, 25]
    assert _log(resumed)[:4] == _log(run)  # the population's rows kept, one more appended


@pytest.mark.slow
def test_cli_population_sweep_killed_mid_population_resumes_exactly(setup, population_sweep):
    d = setup["dir"] / "killed"
    args = [str(EXE), "sweep", "--sweep_config", str(setup["dir"] / "sweep.yaml"), "--data_path", str(setup["corpus"]),
            "--config", str(setup["dir"] / "base.yaml"), "--backend", "population", "--population", "2",
            "--count", "10", "--sweep_dir", str(d)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cursor = d / "trials" / "trial_0000" / "training_cursor.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if json.loads(cursor.read_text())["step"] >= 5:
                break
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    running = [r["trial"] for r in sw.read_records(d) if r["status"] == "running"]
    assert len(running) >= 2  # at least the second population had not trained
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stdout
    for t in range(4):
        name = f"trials/trial_{t:04d}"
        assert _log(d / name) == _log(population_sweep / name)  # bitwise: the same programs and numbers
        assert ckpt.latest_step(d / name, ckpt.LATEST) == 20
    assert [r["trial"] for r in _results(d)] == [r["trial"] for r in _results(population_sweep)]


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, message", [
    (["--population", "0"], "Error: --population: members trained at once must be at least 1, got 0"),
    (["--population", "64", "--count", "64", "--dim", "4096", "--n_heads", "32", "--head_size", "128",
      "--num_blocks", "48"], "Error: --population: 64 members need about "),
    (["--backend", "local", "--population", "2"], "Error: --population: only --backend population"),
])
def test_cli_refuses_bad_populations(extra, message, small_corpus, tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "parameters": {"lr": {"values": [1e-3, 3e-3]}}}))
    args = ["sweep", "--sweep_config", str(spec), "--data_path", str(small_corpus), "--backend", "population",
            "--sweep_dir", str(tmp_path / "sw"), *extra]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2, out.output
    lines = [line for line in out.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and lines[0].startswith(message), out.output
    assert "Traceback" not in out.output and not (tmp_path / "sw").exists()


# ---------------------------------------------------------------------------------------- failures
def test_a_failing_population_keeps_each_members_traceback_and_the_cli_exits_1(small_corpus, tmp_path,
                                                                              monkeypatch):
    """A population that raises marks its trials failed (the sweep goes on), with the whole
    traceback in each member's folder, and `sweep` exits 1 naming them."""
    from dantinox_eqx.tools import population_sweep

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the population")

    monkeypatch.setattr(population_sweep, "fit_population", broken)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "parameters": {"lr": {"values": [1e-3, 3e-3]}}}))
    Config(**BASE).to_yaml(tmp_path / "base.yaml")
    out = CliRunner().invoke(app, ["sweep", "--sweep_config", str(spec), "--data_path", str(small_corpus),
                                   "--config", str(tmp_path / "base.yaml"), "--backend", "population",
                                   "--sweep_dir", str(tmp_path / "sw"), "--count", "2"])
    assert out.exit_code == 1, out.output
    records = sw.read_records(tmp_path / "sw")
    assert [(r["status"], r["reason"]) for r in records] == [("failed", "RuntimeError: a bug in the population")] * 2
    files = [tmp_path / "sw" / r["error_file"] for r in records]
    assert files == [tmp_path / "sw" / "trials" / f"trial_{t:04d}" / sw.ERROR_FILE for t in (0, 1)]
    for file in files:
        lines = file.read_text().splitlines()
        assert lines[0] == "Traceback (most recent call last):" and "fit_population(" in file.read_text()
        assert lines[-1] == "RuntimeError: a bug in the population"
    assert out.output.strip().splitlines()[-1] == (
        f"Error: 2 trial(s) failed (trial 0, 1); their tracebacks: {files[0]}, {files[1]}")
