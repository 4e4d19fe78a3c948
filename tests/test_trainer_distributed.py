"""The Trainer and `dantinox-eqx train` on several devices and several processes.

- tests/trainer_driver.py trains on 4 simulated CPU devices in one subprocess (dp, then fsdp,
  the latter copied at step 10 as a stopped run);
- two `dantinox-eqx train --coordinator ...` processes of 2 devices each train together
  through jax.distributed (gloo), with W&B in offline mode, each under an audit hook
  (tests/audit/sitecustomize.py) that records the files it writes: first without a step limit
  until process 1 alone gets SIGTERM (both must stop at the same checkpoint), then resumed by
  both to step 20;
- the 1-device runs (the reference, and the resume of the 4-device checkpoint) run here.

Every run trains the same config (dropout on, grad_accum 2) on the same corpus, so every log
must match the 1-device one within RTOL. Subprocesses are killed after TIMEOUT_S: a stuck
collective can never hang CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dantinox_eqx.config import Config
from dantinox_eqx.train.trainer import Trainer, read_log
from dantinox_eqx.train.wandb_logger import METRICS_FILE, read_metrics_file, read_wandb_file

from .conftest import TINY, plays_slice
from .procs import device_env, free_port

HERE = Path(__file__).parent
DRIVER = HERE / "trainer_driver.py"
AUDIT = HERE / "audit"
EXE = Path(sys.executable).parent / "dantinox-eqx"
RTOL = 1e-5
TIMEOUT_S = 400  # per subprocess; each takes well under a minute on an idle 2-core machine
# float32, dropout on (its keys must agree across devices), 2 micro-batches of 8 rows (2 per
# device on 4), 10 evaluations in 20 steps. A constant schedule (after warmup) makes the LR of
# a step independent of max_steps, so a run without a step limit logs what a 20-step run logs.
CFG = dict(TINY, vocab_size=None, batch_size=8, grad_accum=2, dropout_rate=0.1, max_steps=20,
           eval_interval=2, eval_iters=2, warmup_steps=5, lr_schedule="constant")
RUN_FILES = {"config.yaml", "tokenizer.json", "model_summary.json", "training_log.csv", "training_cursor.json"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("dist")
    corpus = plays_slice(d / "corpus.txt", 30_000)
    config = Config(**CFG)
    config.to_yaml(d / "config.yaml")
    return {"dir": d, "corpus": corpus, "config": config, "config_file": d / "config.yaml"}


@pytest.fixture(scope="module")
def four(setup) -> Path:
    out = setup["dir"] / "four"
    proc = subprocess.run([sys.executable, str(DRIVER), str(setup["config_file"]), str(setup["corpus"]), str(out)],
                          env=device_env(4), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one(setup) -> Path:
    return Trainer(setup["config"].replace(n_devices=1), progress=False).fit(
        setup["corpus"], run_dir=setup["dir"] / "dp1")


def _launch(setup: dict, d: Path, run: Path, *extra: str) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for i in range(2):
        args = [str(EXE), "train", "--config", str(setup["config_file"]), "--data_path", str(setup["corpus"]),
                "--run_dir", str(run), "--sharding", "fsdp", "--wandb_project", "dist-test",
                "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i), *extra]
        # The compilation cache lets the resumed session reuse the first session's compiled step.
        env = device_env(2, AUDIT_WRITES=str(d / f"writes{i}.txt"), JAX_COMPILATION_CACHE_DIR=str(d / "jax_cache"))
        env["PYTHONPATH"] = os.pathsep.join([str(AUDIT), env["PYTHONPATH"]])
        procs.append(subprocess.Popen(args, cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _finish(procs: list[subprocess.Popen]) -> list[tuple[str, str]]:
    try:
        return [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait_for_step(procs: list[subprocess.Popen], cursor: Path, at_least: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if json.loads(cursor.read_text())["step"] >= at_least:
                return
        except (OSError, ValueError, KeyError):
            pass
        if any(p.poll() is not None for p in procs):
            outs = _finish(procs)
            raise AssertionError(f"a process exited early: {[o[1][-2000:] for o in outs]}")
        time.sleep(0.01)
    for p in procs:
        p.kill()
        p.wait()
    raise AssertionError("no checkpoint in time")


@pytest.fixture(scope="module")
def multi(setup) -> dict:
    """`dantinox-eqx train` as 2 processes x 2 CPU devices (fsdp over the 4), W&B offline:
    started without a step limit and stopped by a SIGTERM to process 1 only, then resumed."""
    d = setup["dir"] / "multi"
    d.mkdir()
    run = d / "run"
    procs = _launch(setup, d, run, "--max_steps", "1000000")
    _wait_for_step(procs, run / "training_cursor.json", 4)
    procs[1].send_signal(signal.SIGTERM)
    stopped = _finish(procs)
    codes = [p.returncode for p in procs]
    assert codes == [143, 143], [o[1][-3000:] for o in stopped]
    steps = [int(re.search(r"interrupted by SIGTERM at step (\d+)", err).group(1)) for _, err in stopped]
    again = _launch(setup, d, run, "--resume")
    resumed = _finish(again)
    assert [p.returncode for p in again] == [0, 0], [o[1][-3000:] for o in resumed]
    writes = []
    for i in range(2):
        lines = (d / f"writes{i}.txt").read_text().splitlines()
        writes.append({Path(line.split(" ", 1)[1]) for line in lines})
    return {"run": run, "stopped_at": steps, "stdout": [a[0] + b[0] for a, b in zip(stopped, resumed)],
            "writes": writes}


def _rows(run: Path) -> list[dict]:
    return read_log(run / "training_log.csv")


def _max_rel(got: list[dict], want: list[dict], column: str) -> float:
    a, b = np.asarray([r[column] for r in got]), np.asarray([r[column] for r in want])
    return float(np.max(np.abs(a - b) / np.abs(b)))


def _same_curve(got: list[dict], want: list[dict], label: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want], label
    diffs = {c: _max_rel(got, want, c) for c in ("train_loss", "val_loss", "lr")}
    print(f"\n[{label}] {len(got)} rows, steps {got[0]['step']}..{got[-1]['step']}: val_loss "
          f"{want[0]['val_loss']:.4f} -> {want[-1]['val_loss']:.4f}; max rel diff "
          + ", ".join(f"{c} {v:.2e}" for c, v in diffs.items()))
    assert diffs["train_loss"] < RTOL and diffs["val_loss"] < RTOL, (label, diffs)
    assert diffs["lr"] < 1e-6, (label, diffs)


def _summary(run: Path) -> dict:
    return json.loads((run / "model_summary.json").read_text())


# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_data_parallel_on_4_devices_logs_what_1_device_logs(one, four):
    want, got = _rows(one), _rows(four / "dp4")
    assert [r["step"] for r in want] == list(range(2, 21, 2))
    _same_curve(got, want, "dp 4 devices vs 1")
    assert want[-1]["val_loss"] < want[0]["val_loss"] - 0.3  # it learns
    s1, s4 = _summary(one)["bytes_per_device"], _summary(four / "dp4")["bytes_per_device"]
    assert (s1["devices"], s4["devices"], s4["sharding"]) == (1, 4, "dp")
    assert s4["params"] == s1["params"] == 4 * _summary(one)["n_params"]  # dp: the whole model on each


@pytest.mark.slow
def test_fsdp_on_4_devices_logs_the_same_with_a_quarter_of_the_bytes(four):
    _same_curve(_rows(four / "fsdp4"), _rows(four / "dp4"), "fsdp vs dp, 4 devices")
    dp, fsdp = _summary(four / "dp4")["bytes_per_device"], _summary(four / "fsdp4")["bytes_per_device"]
    ratios = {k: fsdp[k] / dp[k] for k in ("params", "opt_state")}
    print(f"\n[fsdp bytes per device] params {fsdp['params']} / {dp['params']}, optimizer state "
          f"{fsdp['opt_state']} / {dp['opt_state']}: ratios {ratios}")
    assert fsdp["sharding"] == "fsdp" and fsdp["devices"] == 4
    # every array of this model has a dimension divisible by 4: exactly a quarter (the
    # optimizer's replicated step counters aside)
    assert ratios["params"] == pytest.approx(0.25, abs=1e-9)
    assert ratios["opt_state"] == pytest.approx(0.25, abs=1e-3)


@pytest.mark.slow
def test_a_4_device_fsdp_checkpoint_resumes_on_1_device(setup, four, tmp_path):
    stopped = tmp_path / "stopped"
    shutil.copytree(four / "fsdp4_at10", stopped)
    assert [r["step"] for r in _rows(stopped)] == list(range(2, 11, 2))
    saved = Config.from_yaml(stopped / "config.yaml")
    assert (saved.n_devices, saved.sharding) == (4, "fsdp")
    Trainer(saved.replace(n_devices=1, sharding="dp"), progress=False).fit(setup["corpus"], run_dir=stopped,
                                                                          resume=True)
    got, want = _rows(stopped), _rows(four / "fsdp4")
    assert got[:5] == want[:5]  # the rows before the checkpoint are kept as they were
    _same_curve(got[5:], want[5:], "resumed at step 10 on 1 device vs continued on 4 (fsdp)")


@pytest.mark.slow
def test_two_processes_stop_together_and_resume(multi):
    # process 1 alone got SIGTERM: both stopped at the same checkpoint (saving is collective)
    k0, k1 = multi["stopped_at"]
    print(f"\n[multi stop] SIGTERM to process 1 at step >= 4: both stopped at step {k0}")
    assert k0 == k1 >= 4 and k0 % 2 == 0  # at a checkpoint (every eval_interval=2 steps)
    rows = _rows(multi["run"])
    assert [r["step"] for r in rows] == list(range(2, max(k0, 20) + 1, 2))


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_4_devices(setup, four, multi):
    run = multi["run"]
    rows = [r for r in _rows(run) if r["step"] <= 20]
    _same_curve(rows, _rows(four / "fsdp4"), "2 processes x 2 devices (stopped, resumed) vs 1 process x 4 (fsdp)")
    assert _summary(run)["bytes_per_device"] == _summary(four / "fsdp4")["bytes_per_device"]
    assert Config.from_yaml(run / "config.yaml") == Config.from_yaml(four / "fsdp4" / "config.yaml").replace(
        n_devices=0, wandb_project="dist-test")
    cursor = json.loads((run / "training_cursor.json").read_text())
    assert cursor["finished"] and cursor["step"] == max(multi["stopped_at"][0], 20)

    # Only process 0 writes the run directory's files; checkpoints are collective (both).
    def under_run(paths: set[Path]) -> set[Path]:
        return {p.relative_to(run) for p in paths if p.is_relative_to(run) and p != run}

    w0, w1 = under_run(multi["writes"][0]), under_run(multi["writes"][1])
    assert RUN_FILES <= {str(p) for p in w0}, w0  # the hook sees process 0's writes
    assert any(p.parts[0] == "wandb" for p in w0)
    extra = {p for p in w1 if p.parts[0] != "checkpoints"}
    assert extra == set(), extra
    out0, out1 = multi["stdout"]
    assert f"Saved to: {run}" in out0 and "step 4/1000000" in out0
    # process 1 prints no progress line and no result (gloo's own connection lines aside)
    assert "step " not in out1 and "Saved to" not in out1, out1
    assert (run / "checkpoints" / "latest" / str(cursor["step"])).is_dir() and (run / "checkpoints" / "best").is_dir()


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_rows(multi):
    run = multi["run"]
    # one W&B run (process 0's), continued by the resumed session: two files of the same run id
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    assert len(files) == 2 and files[0].name == files[1].name
    first, second = (read_wandb_file(f) for f in files)
    history = first["history"] + second["history"]
    rows = _rows(run)
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    assert [h["val_loss"] for h in history] == [r["val_loss"] for r in rows]
    assert second["summary"]["val_loss"] == rows[-1]["val_loss"]
    config = second["config"]
    assert config["sharding"] == "fsdp" and config["wandb_project"] == "dist-test" and config["max_steps"] == 20
    assert config["model_summary"]["bytes_per_device"]["devices"] == 4
    assert [r["val_loss"] for r in read_metrics_file(run / METRICS_FILE)] == [r["val_loss"] for r in rows]
