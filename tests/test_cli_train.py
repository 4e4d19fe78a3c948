"""`dantinox-eqx train` / `plot`, run as the real executable in a subprocess."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dantinox_eqx.config import Config
from dantinox_eqx.train.trainer import read_log

from .conftest import TINY

EXE = Path(sys.executable).parent / "dantinox-eqx"


def cli(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([str(EXE), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def corpus(tmp_path: Path, shakespeare: Path) -> Path:
    p = tmp_path / "data" / "corpus.txt"
    p.parent.mkdir()
    p.write_text(shakespeare.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return p


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "tiny.yaml"
    path.parent.mkdir(exist_ok=True)
    Config(**{**TINY, "vocab_size": None, "max_steps": 4, "eval_interval": 2}).to_yaml(path)
    return path


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def _contents(root: Path) -> dict[str, tuple[int, str | None]]:
    """Every path under `root`: (mtime in ns, sha256 of a file's bytes; None for a folder)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in root.rglob("*")}


def test_help_is_complete():
    top = cli("--help")
    assert top.returncode == 0 and "train" in top.stdout and "plot" in top.stdout
    train = cli("train", "--help")
    assert train.returncode == 0
    for name in ("config", "data_path", "run_dir", "resume", "coordinator", "num_processes", "process_id",
                 *(f.name for f in dataclasses.fields(Config))):
        assert f"--{name} " in train.stdout, name
    assert "resid" in train.stdout  # field comments become option help ("residual width")
    plot = cli("plot", "--help")
    assert plot.returncode == 0 and "RUN_DIR" in plot.stdout


@pytest.mark.slow
def test_overrides_reach_config_yaml_and_resume_keeps_them(tmp_path: Path, corpus: Path, config_file: Path):
    run = tmp_path / "run"
    done = cli("train", "--config", config_file, "--data_path", corpus, "--run_dir", run,
               "--lr", "2e-3", "--use_bf16", "True", "--kv_heads", "2")
    assert done.returncode == 0, done.stderr
    assert f"Saved to: {run}" in done.stdout
    saved = Config.from_yaml(run / "config.yaml")
    assert (saved.lr, saved.use_bf16, saved.kv_heads, saved.max_steps) == (2e-3, True, 2, 4)
    assert '"dtype": "bfloat16"' in (run / "model_summary.json").read_text()

    # Resuming without --config continues with the run's own config.yaml (overrides included).
    more = cli("train", "--run_dir", run, "--resume", "--max_steps", "6")
    assert more.returncode == 0, more.stderr
    saved = Config.from_yaml(run / "config.yaml")
    assert (saved.lr, saved.use_bf16, saved.max_steps) == (2e-3, True, 6)
    assert [r["step"] for r in read_log(run / "training_log.csv")] == [2, 4, 6]

    # A refused resume (another model shape, found after the run is locked) leaves the run
    # directory byte-identical: run.lock still names the process that trained it.
    before = _contents(run)
    refused = cli("train", "--run_dir", run, "--resume", "--dim", "64", "--head_size", "16")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("Error: dim: the run in ") and "keeps the model's shape" in refused.stderr
    assert _contents(run) == before

    plotted = cli("plot", run)
    assert plotted.returncode == 0, plotted.stderr
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


BAD_INPUTS = {
    "missing data file": (["--data_path", "{tmp}/nope.txt"], "data_path: '{tmp}/nope.txt' does not exist"),
    "unknown flag": (["--learning_rate", "3"], "No such option '--learning_rate'"),
    "bad value type": (["--lr", "fast"], "lr: expected a number, got 'fast'"),
    "dim/head mismatch": (["--dim", "100"], "dim: must equal n_heads * head_size"),
    "non-empty run_dir": (["--run_dir", "{tmp}/busy"], "run_dir: '{tmp}/busy' is not empty; pass --resume"),
    "partial multi-host flags": (["--num_processes", "2"], "coordinator: multi-process training needs coordinator"),
    "bad coordinator": (["--coordinator", "node0", "--num_processes", "2", "--process_id", "0"],
                        "coordinator: expected HOST:PORT"),
    "process_id out of range": (["--coordinator", "127.0.0.1:1", "--num_processes", "2", "--process_id", "2"],
                                "process_id: 2 must be in [0, num_processes=2)"),
    # issue 16
    "muon on a group it cannot handle": (["--optimizer", "muon", "--muon_params", "head"],
                                         "muon_params: Muon cannot train 'head'"),
    "logit_softcap <= 0": (["--logit_softcap", "0"], "logit_softcap: must be positive"),
    "unknown activation": (["--activation", "swish"], "activation: unknown value 'swish'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.slow
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case: str, tmp_path: Path, corpus: Path,
                                                            config_file: Path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("not a run")
    args, message = BAD_INPUTS[case]
    args = [a.format(tmp=tmp_path) for a in args]
    if "--data_path" not in args:
        args += ["--data_path", str(corpus)]
    before = _snapshot(tmp_path)
    out = cli("train", "--config", config_file, *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message.format(tmp=tmp_path) in errors[0], out.stderr
    # Nothing else on stderr but Click's usage hint: no traceback, no JAX/orbax log noise.
    noise = [line for line in out.stderr.splitlines()
             if line.strip() and not line.startswith(("Error:", "Usage:", "Try "))]
    assert noise == [], out.stderr
    assert _snapshot(tmp_path) == before  # nothing written (no runs/, no run_dir, no token cache)


@pytest.mark.slow
def test_divergence_exits_1_with_one_line(tmp_path: Path, corpus: Path, config_file: Path):
    out = cli("train", "--config", config_file, "--data_path", corpus, "--run_dir", tmp_path / "run",
              "--lr", "1e6", "--grad_clip", "0", "--warmup_steps", "0", "--max_steps", "40",
              "--eval_interval", "10")
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("Error: training diverged at step ") and out.stderr.count("\n") == 1
    assert "Traceback" not in out.stderr
