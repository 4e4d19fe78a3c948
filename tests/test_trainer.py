"""Trainer: the run directory, exact resume (after SIGKILL), SIGTERM, early stopping, NaN."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest
import yaml

from dantinox_eqx.config import Config, ConfigError
from dantinox_eqx.data.sampling import prepare_data, sample_batch
from dantinox_eqx.data.tokenizer import load_tokenizer
from dantinox_eqx.model import Transformer
from dantinox_eqx.run import checkpoint as ckpt
from dantinox_eqx.run import runlock
from dantinox_eqx.train.step import make_eval_step
from dantinox_eqx.train.trainer import CURSOR_FILE, LOG_COLUMNS, Trainer, TrainingDiverged, read_log

from .conftest import TINY

EXE = Path(sys.executable).parent / "dantinox-eqx"
# Everything but wall-clock timing must match between a resumed and an uninterrupted run.
EXACT = [c for c in LOG_COLUMNS if c not in ("ms_per_step", "tokens_per_s")]


def tiny(**kw) -> Config:
    base = {**TINY, "vocab_size": None, "eval_iters": 2, "warmup_steps": 10}
    return Config(**{**base, **kw})


@pytest.fixture
def corpus(tmp_path: Path, shakespeare: Path) -> Path:
    """A 60 kB slice of tiny Shakespeare in a writable folder (the token cache goes beside it)."""
    p = tmp_path / "corpus.txt"
    p.write_text(shakespeare.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return p


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}


def _params_like(run_dir: Path):
    cfg = Config.from_yaml(run_dir / "config.yaml")
    return cfg, eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_end_to_end_run_directory(tmp_path: Path, corpus: Path):
    config = tiny(max_steps=120, eval_interval=20)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    rows_seen = []
    trainer = Trainer(config, loggers=[rows_seen.append])
    run = trainer.fit(corpus, run_dir=tmp_path / "run")
    assert run == tmp_path / "run"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers

    saved = Config.from_yaml(run / "config.yaml")
    tok = load_tokenizer(run / "tokenizer.json")
    assert saved == config.replace(vocab_size=tok.get_vocab_size())
    summary = json.loads((run / "model_summary.json").read_text())
    cfg, (params, static) = _params_like(run)
    assert summary["n_params"] == sum(x.size for x in jax.tree.leaves(params))
    assert summary["optimizer_mem_MB"] > summary["weights_mem_MB"] > 0  # Adam: 2 moments per weight
    assert summary["tokens_per_step"] == 4 * 16

    rows = read_log(run / "training_log.csv")
    assert [r["step"] for r in rows] == [20, 40, 60, 80, 100, 120]  # one row per evaluation
    assert rows_seen == rows  # loggers get exactly the logged rows
    best_val = min(r["val_loss"] for r in rows)
    chance = math.log(tok.get_vocab_size())  # the loss of a uniform guess (~ the loss at init)
    assert best_val < chance - 0.8 and rows[-1]["val_loss"] < chance - 0.7  # it learns
    cursor = json.loads((run / CURSOR_FILE).read_text())
    assert cursor["step"] == 120 and cursor["finished"] and cursor["best_val_loss"] == best_val

    # Best checkpoint: its step is the best row's; re-evaluating it with the documented eval
    # keys (fold_in(eval, step)) reproduces the logged val loss exactly.
    best_step, best_params, _ = ckpt.restore(run, ckpt.BEST, params)
    assert best_step == cursor["best_step"] == next(r["step"] for r in rows if r["val_loss"] == best_val)
    data = prepare_data(corpus, tokenizer_type="char", max_context=cfg.max_context, tokenizer=tok)
    eval_key = jax.random.split(jax.random.key(cfg.seed), 4)[3]
    _, k_val = jax.random.split(jax.random.fold_in(eval_key, best_step))
    val = sample_batch(jax.numpy.asarray(data.val), k_val, cfg.batch_size, cfg.max_context, accum=cfg.eval_iters)
    assert float(make_eval_step(static)(best_params, val)["loss"]) == best_val
    assert ckpt.latest_step(run, ckpt.LATEST) == 120


def _write_config(path: Path, config: Config) -> Path:
    config.to_yaml(path)
    return path


def _wait_for_cursor(proc: subprocess.Popen, cursor: Path, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            step = json.loads(cursor.read_text())["step"]
        except (OSError, ValueError, KeyError):
            step = -1
        if step >= at_least:
            return step
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("no checkpoint in time")


def _train_and_kill(tmp_path: Path, config: Config, data: Path, run_dir: Path, at_least: int) -> int:
    """`dantinox-eqx train` `config` on `data` into `run_dir`, SIGKILLed once a checkpoint at
    step >= `at_least` is written; returns the latest checkpoint's step."""
    cfg_file = _write_config(tmp_path / "cfg.yaml", config)
    proc = subprocess.Popen([str(EXE), "train", "--config", str(cfg_file), "--data_path", str(data),
                             "--run_dir", str(run_dir)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _wait_for_cursor(proc, run_dir / CURSOR_FILE, at_least)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return ckpt.latest_step(run_dir, ckpt.LATEST)


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_rows(tmp_path: Path, corpus: Path):
    config = tiny(max_steps=200, eval_interval=20, dropout_rate=0.1)  # dropout: keys must resume too
    killed = tmp_path / "killed"
    assert 100 <= _train_and_kill(tmp_path, config, corpus, killed, 100) < 200  # killed mid-run, not finished

    Trainer(config).fit(corpus, run_dir=killed, resume=True)
    reference = Trainer(config).fit(corpus, run_dir=tmp_path / "reference")

    got, want = read_log(killed / "training_log.csv"), read_log(reference / "training_log.csv")
    assert len(want) == 10
    assert [{k: r[k] for k in EXACT} for r in got] == [{k: r[k] for k in EXACT} for r in want]
    _, (params, _) = _params_like(reference)
    for which in (ckpt.LATEST, ckpt.BEST):
        a, b = ckpt.restore(killed, which, params)[:2], ckpt.restore(reference, which, params)[:2]
        assert a[0] == b[0]
        for x, y in zip(_leaves(a[1]), _leaves(b[1])):
            np.testing.assert_array_equal(x, y)  # bitwise
    assert json.loads((killed / CURSOR_FILE).read_text())["best_val_loss"] == min(r["val_loss"] for r in want)


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint_and_exits_143(tmp_path: Path, corpus: Path):
    cfg_file = _write_config(tmp_path / "cfg.yaml", tiny(max_steps=1_000_000, eval_interval=10))
    run = tmp_path / "run"
    proc = subprocess.Popen([str(EXE), "train", "--config", str(cfg_file), "--data_path", str(corpus),
                             "--run_dir", str(run)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_cursor(proc, run / CURSOR_FILE, 10)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    assert f"resume with: dantinox-eqx train --config {run / 'config.yaml'} --run_dir {run}" in err
    assert err.rstrip().endswith("--resume")
    cursor = json.loads((run / CURSOR_FILE).read_text())
    step = ckpt.latest_step(run, ckpt.LATEST)
    assert step == cursor["step"] >= 10
    _, (params, _) = _params_like(run)
    restored_step, restored, _ = ckpt.restore(run, ckpt.LATEST, params)
    assert restored_step == step and all(np.isfinite(x).all() for x in _leaves(restored))


@pytest.mark.slow
def test_early_stopping_with_patience(tmp_path: Path, corpus: Path):
    # lr 1e-9: the weights do not move, so val only changes by the eval batches drawn.
    config = tiny(max_steps=400, eval_interval=5, lr=1e-9, warmup_steps=0, patience=2)
    run = Trainer(config).fit(corpus, run_dir=tmp_path / "run")
    rows = read_log(run / "training_log.csv")
    cursor = json.loads((run / CURSOR_FILE).read_text())
    assert cursor["stopped_early"] and rows[-1]["step"] == cursor["step"] < 400
    # Replay the rule on the logged rows: stop at the first 2 evaluations in a row without a new best.
    best, waited = float("inf"), 0
    for i, r in enumerate(rows):
        best, waited = (r["val_loss"], 0) if r["val_loss"] < best else (best, waited + 1)
        assert (waited >= 2) == (i == len(rows) - 1)
    assert cursor["best_val_loss"] == best and ckpt.latest_step(run, ckpt.LATEST) == rows[-1]["step"]


@pytest.mark.slow
def test_resume_rules_and_nan_keeps_the_last_good_checkpoint(tmp_path: Path, corpus: Path):
    run = Trainer(tiny(max_steps=5, eval_interval=5)).fit(corpus, run_dir=tmp_path / "run")
    files = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    for field, value in (("num_blocks", 3), ("kv_heads", 2), ("max_context", 8), ("optimizer", "lion"),
                         ("grad_clip", 0.0), ("seed", 7)):
        with pytest.raises(ConfigError, match=rf"^{field}: the run in .* was trained with {field}="):
            Trainer(tiny(max_steps=10, eval_interval=5, **{field: value})).fit(corpus, run_dir=run, resume=True)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == files  # nothing written

    # Changing max_steps / patience on resume is allowed; config.yaml records the new values.
    Trainer(tiny(max_steps=10, eval_interval=5, patience=3)).fit(corpus, run_dir=run, resume=True)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["max_steps"] == 10 and saved["patience"] == 3
    assert [r["step"] for r in read_log(run / "training_log.csv")] == [5, 10]

    # A diverging continuation (lr 1e6: Adam's step is ~lr whatever the clipping) stops at its
    # first evaluation, saving nothing.
    _, (params, _) = _params_like(run)
    _, before, _ = ckpt.restore(run, ckpt.LATEST, params)
    cursor_before = (run / CURSOR_FILE).read_text()
    log_before = (run / "training_log.csv").read_text()
    diverging = tiny(max_steps=40, eval_interval=10, lr=1e6, warmup_steps=0)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 20 .*last good checkpoint \(step 10\)"):
        Trainer(diverging).fit(corpus, run_dir=run, resume=True)
    step, after, _ = ckpt.restore(run, ckpt.LATEST, params)
    assert step == 10 and ckpt.latest_step(run, ckpt.BEST) in (5, 10)
    for x, y in zip(_leaves(before), _leaves(after)):
        np.testing.assert_array_equal(x, y)
    assert (run / CURSOR_FILE).read_text() == cursor_before
    assert (run / "training_log.csv").read_text() == log_before


@pytest.mark.slow
def test_a_warmup_longer_than_the_run_is_warned_about(tmp_path: Path, corpus: Path, capsys):
    """The lr of a run shorter than its warmup never reaches `lr` (the default warmup of 400
    steps under a 12-step fine-tune): one warning line, with the lr it does reach."""
    def warnings(run: str, **kw) -> list[str]:
        capsys.readouterr()
        Trainer(tiny(max_steps=4, eval_interval=4, **kw), progress=False).fit(corpus, run_dir=tmp_path / run)
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]

    assert warnings("long", warmup_steps=10) == [
        "warning: warmup_steps: 10 is not below the run's 4 steps, so the lr rises to 1.20e-03 at most and never "
        "reaches lr=0.003; set --warmup_steps 1 or so"]
    assert warnings("short", warmup_steps=2) == []


def test_run_dir_guards(tmp_path: Path, corpus: Path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty; pass --resume"):
        Trainer(tiny()).fit(corpus, run_dir=busy)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint to resume"):
        Trainer(tiny()).fit(corpus, run_dir=tmp_path / "empty", resume=True)
    assert not (tmp_path / "empty").exists()
    with pytest.raises(ConfigError, match="use_lora"):
        Trainer(tiny(use_lora=True)).fit(corpus, run_dir=tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_a_lock_taken_before_the_run_is_accepted_leaves_run_lock_as_it_was(tmp_path: Path):
    """`acquire(record=False)` (a resume checking its inputs) writes nothing; a second writer
    is told the holder is starting up, not the dead pid the file still names; `record()` then
    names this process."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid of this host that no longer runs: the earlier writer
    earlier = json.dumps({"pid": gone.pid, "host": socket.gethostname()}) + "\n"
    (tmp_path / runlock.LOCK_FILE).write_text(earlier)
    lock = runlock.RunLock(tmp_path).acquire(record=False)
    try:
        assert (tmp_path / runlock.LOCK_FILE).read_text() == earlier
        with pytest.raises(runlock.RunLockedError, match=r"in use by another training run \(a process still "
                                                         r"starting up, not yet recorded in run.lock\)"):
            runlock.RunLock(tmp_path).acquire()
        lock.record()
        assert runlock.holder(tmp_path) == {"pid": os.getpid(), "host": socket.gethostname()}
    finally:
        lock.release()


def test_default_run_dir_is_timestamped_and_never_shared(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(tiny())
    first = trainer._resolve_run_dir(None, resume=False)
    assert first.parent == Path("runs") and first.name.startswith("run_")
    assert len(first.name.split("_")[1]) == 8 and len(first.name.split("_")[2]) == 6  # YYYYMMDD_HHMMSS
    first.mkdir(parents=True)
    second = trainer._resolve_run_dir(None, resume=False)  # same second or not: a new directory
    assert second != first and not second.exists()
