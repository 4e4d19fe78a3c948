"""Resume after any interruption (issue 19): kill -9 at random moments and at every phase of a
checkpoint write, one writer per run directory, checked checkpoints with a fallback, a full
disk, SIGTERM during start-up, an empty config, and the modes of the files a run writes.

The fault-injection test runs FAULT_TRIALS trials (default 1: every phase once, what CI runs;
the environment variable DANTINOX_EQX_FAULT_TRIALS raises it, e.g. to 10, for a long manual run
with fresh random draws). Each trial trains the tiny config with `dantinox-eqx train` in a
subprocess killed (SIGKILL) at a random moment of each phase of a run's life (each kill checked
to have landed there, while the process was alive), then at every phase of a checkpoint write
(the test seam checkpoint.FAULT_ENV), each attempt resuming the one before, as a user would;
then one `--resume` must finish it: its log (all but the timing columns) and its checkpoints
(params and train_state) equal the uninterrupted run's bitwise.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
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

from dantinox_eqx import files
from dantinox_eqx.config import Config, ConfigError
from dantinox_eqx.parallel import sharding
from dantinox_eqx.run import checkpoint as ckpt
from dantinox_eqx.run import runlock
from dantinox_eqx.run.pretrained import from_pretrained
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.state import TrainState
from dantinox_eqx.train.step import init_opt_state
from dantinox_eqx.train.trainer import Trainer, TrainingWriteError, read_log

from .test_trainer import EXACT, _leaves, _params_like

EXE = Path(sys.executable).parent / "dantinox-eqx"
# 60 steps, a checkpoint (and an evaluation) every 10: 6 latest checkpoints, keep_checkpoints 2.
CFG = dict(dim=32, n_heads=4, head_size=8, num_blocks=2, max_context=16, batch_size=4, expansion=2,
           lr=3e-3, warmup_steps=5, max_steps=60, eval_interval=10, eval_iters=2)
FAULT_TRIALS = int(os.environ.get("DANTINOX_EQX_FAULT_TRIALS", "1"))
TIMEOUT_S = 300  # per subprocess; a few seconds each on an idle machine
WORDS = ("the of and to in is was that for it with as his on be at by this had not are but from or have an "
         "they which one you were her all she there would their we him been has when who will more no if "
         "out so said what up its about into than them can only other new some could time these two may").split()


def _corpus(path: Path) -> Path:
    """40 kB of seeded random words (no file outside the repository is read)."""
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(9000))
    path.write_text("\n".join(text[i:i + 70] for i in range(0, len(text), 70)) + "\n", encoding="utf-8")
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ckpt.FAULT_ENV}  # DANTINOX_EQX_CACHE: `cache`
    return {**env, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu", "WANDB_MODE": "offline",
            **extra}


def _exact(run: Path) -> list[dict]:
    return [{k: r[k] for k in EXACT} for r in read_log(run / "training_log.csv")]


def _restored(run: Path, which: str) -> tuple[int, list[np.ndarray]]:
    """Checkpoint `which` of `run`: its step and its leaves, params then (latest only)
    train_state: the optimizer state, the key and the counters a resume continues from."""
    cfg, (params, _) = _params_like(run)
    like = None
    if which == ckpt.LATEST:
        optimizer = make_optimizer(cfg, cfg.max_steps)
        state = TrainState.initial(params, init_opt_state(optimizer, params), key=jax.random.key(cfg.seed))
        like = state.checkpoint_tree(sharding.make_mesh(1))
    step, restored, tree = ckpt.restore(run, which, params, like, warn=None)
    if tree is not None:  # a typed PRNG key compares by its data
        tree = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)
    leaves = _leaves(restored) + (_leaves(tree) if tree is not None else [])
    return step, leaves


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _assert_same_run(run: Path, reference: Path) -> None:
    """Log rows (all but timing) and both checkpoints (params, and the latest's train_state)
    bitwise equal; nothing half-written left."""
    assert _exact(run) == _exact(reference)
    for which in (ckpt.LATEST, ckpt.BEST):
        (sa, a), (sb, b) = _restored(run, which), _restored(reference, which)
        assert sa == sb and len(a) == len(b), which
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
        names = sorted(p.name for p in ckpt.checkpoint_dir(run, which).iterdir())
        assert all(n.isdigit() for n in names), names  # no .writing / .old / .deleting / orbax tmp
    assert len(ckpt.steps(run, ckpt.LATEST)) == 2  # keep_checkpoints
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory) -> Path:
    """This module's token cache (DANTINOX_EQX_CACHE), not the user's."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DANTINOX_EQX_CACHE", str(path))
        mp.delenv(ckpt.FAULT_ENV, raising=False)
        yield path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cache) -> dict:
    """The corpus, the config file and the uninterrupted reference run (in-process, umask 022)."""
    d = tmp_path_factory.mktemp("resume")
    corpus = _corpus(d / "corpus.txt")
    config = Config(**CFG)
    config.to_yaml(d / "config.yaml")
    old_umask = os.umask(0o022)
    try:
        reference = Trainer(config, progress=False).fit(corpus, run_dir=d / "reference")
    finally:
        os.umask(old_umask)
    rows = read_log(reference / "training_log.csv")
    best, improved = float("inf"), []
    for r in rows:  # the steps whose evaluation saved a best checkpoint
        if r["val_loss"] < best:
            best = r["val_loss"]
            improved.append(r["step"])
    return {"dir": d, "corpus": corpus, "config": config, "config_file": d / "config.yaml",
            "reference": reference, "improved": improved}


def _train_cmd(setup: dict, run: Path) -> list[str]:
    """What the user runs: the first command, or `--resume` once the run directory exists."""
    cmd = [str(EXE), "train", "--config", str(setup["config_file"]), "--data_path", str(setup["corpus"]),
           "--run_dir", str(run)]
    return cmd + ["--resume"] if run.exists() else cmd


def _attempt(setup: dict, run: Path, kill_after: tuple[str, float, int] | None = None, fault: str | None = None
             ) -> tuple[int, str, float]:
    """One `dantinox-eqx train` attempt: (exit code, stderr, seconds). `kill_after` =
    (phase, delay, s): SIGKILL `delay` s after `phase` began (PHASE_START) while the process
    runs, or at once when the phase is seen to have ended first (a miss: no use running on);
    `fault` sets the checkpoint-write seam."""
    env = _env(**({ckpt.FAULT_ENV: fault} if fault else {}))
    start = time.monotonic()
    proc = subprocess.Popen(_train_cmd(setup, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    if kill_after is not None:
        phase, delay, s = kill_after
        since = None
        while proc.poll() is None:
            if since is None and PHASE_START[phase](run):
                since = time.monotonic()
            if (since is not None and time.monotonic() - since >= delay) or _phase(run, s) > phase:
                proc.kill()
                break
            time.sleep(0.002)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, err, time.monotonic() - start


# Every (checkpoint, phase) of a save a kill can land in (run/save_guard.py `fault`), in the
# order one trial reaches them ({s}: a step whose evaluation saved a best checkpoint, so the best
# save and then the latest save happen there). Each attempt is killed at its seam, and the next
# `--resume` redoes step {s} from the latest checkpoint before it (or, after "committed" and
# "pruned", goes on from {s}). The latest checkpoint's "moved" (replacing a published step) is
# the one phase no kill can reach: a resume begins at the newest published latest checkpoint, so
# it never saves that step again (test_saving_is_idempotent... covers the replacement itself).
SEAMS = ["best:{s}:start", "best:{s}:written", "best:{s}:digested", "best:{s}:committed",
         "best:{s}:pruned",  # best {s} published: the next resume replaces it ...
         "latest:{s}:start", "best:{s}:moved",  # ... and is killed between its two renames
         "latest:{s}:written", "latest:{s}:digested", "latest:{s}:committed",  # latest {s} published
         "latest:{n}:pruned"]  # {n}: the next latest checkpoint, saved by the resume from {s}
# The phases of a run's life a random kill is drawn in (and then checked to have landed in, from
# what the run directory holds after it): before the run directory exists (importing, reading
# the config and the data), before its first checkpoint (start-up, compiling, the first steps),
# and between its first checkpoint and step {s} (training, evaluating, saving).
PHASES = ("0: no run directory", "1: no checkpoint yet", "2: after a checkpoint")  # in order (compared)


# What starts each phase, as the test sees it from outside: a kill is drawn at a random delay
# after it, within the phase's length in the timed run.
PHASE_START = {PHASES[0]: lambda run: True,  # the process started
               PHASES[1]: lambda run: run.exists(),
               PHASES[2]: lambda run: bool(ckpt.steps(run, ckpt.LATEST))}


def _phase(run: Path, s: int) -> str:
    """Where in a run's life a kill landed, from what the run directory holds after it."""
    if not run.exists():
        return PHASES[0]
    latest = ckpt.steps(run, ckpt.LATEST)
    if not latest:
        return PHASES[1]
    return PHASES[2] if latest[-1] < s else "3: past step s"


def _timed(setup: dict, run: Path) -> tuple[float, dict[str, float]]:
    """One uninterrupted CLI run: its duration and when (seconds from its start) its run
    directory and each latest checkpoint appeared."""
    start = time.monotonic()
    proc = subprocess.Popen(_train_cmd(setup, run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    seen: dict[str, float] = {}
    while proc.poll() is None:
        now = time.monotonic() - start
        if run.exists():
            seen.setdefault("dir", now)
            for step in ckpt.steps(run, ckpt.LATEST):
                seen.setdefault(str(step), now)
        time.sleep(0.002)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0 and "Traceback" not in err, err
    return time.monotonic() - start, seen


def _lengths(seen: dict[str, float], s: int) -> dict[str, float]:
    """How long each phase lasted in the timed run (the last: half the way from the first
    checkpoint to step s's, so that the kill leaves step s to the seams)."""
    return {PHASES[0]: seen["dir"], PHASES[1]: seen["10"] - seen["dir"], PHASES[2]: (seen[str(s)] - seen["10"]) / 2}


def _random_kills(setup: dict, run: Path, lengths: dict, s: int, rng: random.Random, events: list) -> int:
    """One SIGKILL landing in each phase, in order, each while the run is alive: at a random
    delay after the phase began (PHASE_START), within its length. A kill that landed too
    early changed nothing this test relies on: drawn again in place. One that landed too
    late, or a run that finished before its kill: the run directory is removed and the phases
    start over. Returns how many draws missed."""
    missed = 0
    for _ in range(5):
        if run.exists():
            shutil.rmtree(run)
        events.clear()
        for i, phase in enumerate(PHASES):
            for _ in range(5):
                t = rng.uniform(0.0, lengths[phase])
                rc, err, _ = _attempt(setup, run, kill_after=(phase, t, s))
                assert rc in (0, -signal.SIGKILL), err
                landed = _phase(run, s) if rc == -signal.SIGKILL else "finished"
                if landed == phase:
                    events.append(f"kill -9 {t:.2f}s in: {phase}")
                    break
                missed += 1
                print(f"[fault injection] kill {t:.2f}s into {phase!r} landed in {landed!r}: drawn again")
                if landed not in PHASES[:i]:
                    break  # too late: start over
            else:
                raise AssertionError(f"no kill landed in {phase!r} in 5 draws")
            if landed != phase:
                break
        else:
            return missed
    raise AssertionError("the random kills missed their phases 5 times over")


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_gives_the_uninterrupted_run(setup, tmp_path):
    """Each trial: three random kills, one in each phase of a run's life (PHASES), then a kill
    at every phase of a checkpoint write (SEAMS), each attempt a `--resume` of the one before;
    then one `--resume`, which must finish the run: its log, its checkpoints' params and
    train_state (optimizer state, key, counters) equal the uninterrupted run's bitwise.
    FAULT_TRIALS (DANTINOX_EQX_FAULT_TRIALS) trials, fresh random draws each."""
    reference = setup["reference"]
    rng = random.Random(int(os.environ.get("DANTINOX_EQX_FAULT_SEED", "19")))
    # The seam step: the first step from 30 on whose evaluation saved a best checkpoint (with a
    # latest checkpoint after it); 10 to 20 leaves room for the kill "after a checkpoint".
    s = next(step for step in setup["improved"] if 30 <= step <= 50)
    duration, seen = _timed(setup, tmp_path / "timed")
    assert _exact(tmp_path / "timed") == _exact(reference)  # the CLI run is the in-process run
    # Phases as the attempts will see them: the first run may fill the compilation cache that
    # every later one reads (its phase 1 then seconds longer, and kills drawn in it land late),
    # so each phase's length is the shorter of two runs'.
    _, seen_again = _timed(setup, tmp_path / "timed_again")
    lengths = {phase: min(a, b) for (phase, a), b in zip(_lengths(seen, s).items(), _lengths(seen_again, s).values())}
    landed = {phase: 0 for phase in PHASES}
    seams, missed, results = 0, 0, []
    for i in range(FAULT_TRIALS):
        run = tmp_path / f"trial{i}"
        events: list[str] = []
        missed += _random_kills(setup, run, lengths, s, rng, events)
        for phase in PHASES:
            landed[phase] += sum(e.endswith(phase) for e in events)
        for seam in SEAMS:
            fault = seam.format(s=s, n=s + 10)
            rc, err, _ = _attempt(setup, run, fault=f"{fault}:kill")
            assert rc == -signal.SIGKILL, (fault, rc, err)  # killed at the seam: the process reached it
            events.append(fault)
            seams += 1
        rc, err, _ = _attempt(setup, run)  # one --resume: always enough
        assert rc == 0 and "Traceback" not in err, (events, err)
        _assert_same_run(run, reference)
        results.append(events)
        shutil.rmtree(run)
    assert landed == {phase: FAULT_TRIALS for phase in PHASES}
    assert seams == len(SEAMS) * FAULT_TRIALS
    print(f"\n[fault injection] {FAULT_TRIALS} trial(s) resumed to the uninterrupted run (one run {duration:.1f}s; "
          f"{missed} random kill(s) drawn again): " + " | ".join(", ".join(e) for e in results))


# --------------------------------------------------------------------------------- the lock
_HOLDER = ("import sys, time; from dantinox_eqx.run.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
           "print('locked', flush=True); time.sleep(600)")


def _hold_lock(run: Path) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_the_run_lock_refuses_a_second_writer_and_dies_with_its_holder(tmp_path):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        host = re.escape(socket.gethostname())
        with pytest.raises(runlock.RunLockedError, match=rf"^run_dir: .* is in use by another training run "
                                                         rf"\(process {holder.pid} on host {host}\)"):
            runlock.RunLock(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # a kill -9 never leaves the run locked
        holder.wait()
    with runlock.RunLock(run) as lock:
        assert lock.held and runlock.holder(run)["pid"] == os.getpid()
        with pytest.raises(runlock.RunLockedError):  # the lock is per open file, even in one process
            runlock.RunLock(run).acquire()
    assert runlock.RunLock(run).acquire().held  # released on exit


@pytest.mark.slow
def test_a_second_training_process_exits_2_naming_the_holder(setup, tmp_path):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        for args in (["--resume"], []):  # a resume, and a new run into the (lock-only, so empty) directory
            out = subprocess.run([str(EXE), "train", "--config", str(setup["config_file"]), "--data_path",
                                  str(setup["corpus"]), "--run_dir", str(run), *args],
                                 env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
            assert out.returncode == 2, out.stderr
            assert out.stderr.strip().splitlines() == [
                f"Error: run_dir: {str(run)!r} is in use by another training run (process {holder.pid} on host "
                f"{socket.gethostname()}); wait for it to finish or stop it, or choose another --run_dir"], out.stderr
            assert sorted(p.name for p in run.iterdir()) == [runlock.LOCK_FILE]  # it wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# --------------------------------------------------------------------------------- corruption
class _Stop(Exception):
    pass


def _interrupted(setup: dict, run: Path, at: int = 40) -> Path:
    """The run stopped right after its step-`at` checkpoint (latest: at - 10 and at)."""

    def stop(row: dict) -> None:  # loggers are called after the checkpoint of their row
        if row["step"] == at:
            raise _Stop

    with pytest.raises(_Stop):
        Trainer(setup["config"], loggers=[stop], progress=False).fit(setup["corpus"], run_dir=run)
    assert ckpt.steps(run, ckpt.LATEST) == [at - 10, at]
    return run


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[64:320] = bytes(b ^ 0xA5 for b in data[64:320])  # 256 bytes changed
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.fixture(scope="module")
def stopped_at_40(setup, tmp_path_factory) -> Path:
    return _interrupted(setup, tmp_path_factory.mktemp("stopped") / "run")


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbled params", "truncated params", "garbled train_state",
                                    "truncated train_state"])
def test_a_damaged_latest_checkpoint_is_skipped_and_resume_is_still_exact(setup, stopped_at_40, tmp_path, damage,
                                                                         capsys):
    run = shutil.copytree(stopped_at_40, tmp_path / "run")
    how, item = damage.split()
    bad = ckpt.checkpoint_dir(run, ckpt.LATEST) / "40"
    victim = _largest_file(bad / item)
    (_garble if how == "garbled" else _truncate)(victim)
    assert ckpt.check(bad) == f"{victim.relative_to(bad).as_posix()} does not match its digest (garbled or truncated)"
    capsys.readouterr()

    Trainer(setup["config"], progress=False).fit(setup["corpus"], run_dir=run, resume=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipping the latest checkpoint {str(bad)!r}: {victim.relative_to(bad).as_posix()} "
                        "does not match its digest (garbled or truncated); using step 30"]
    _assert_same_run(run, setup["reference"])


@pytest.mark.slow
def test_no_intact_checkpoint_left_exits_2_and_loaders_never_load_a_bad_one(setup, stopped_at_40, tmp_path):
    run = shutil.copytree(stopped_at_40, tmp_path / "run")
    latest = ckpt.checkpoint_dir(run, ckpt.LATEST)
    _garble(_largest_file(latest / "40" / "params"))
    # generate / eval / export load through from_pretrained: the damaged step 40 is never used
    with pytest.warns(ckpt.CheckpointWarning, match=r"skipping the latest checkpoint .*/40'.*; using step 30"):
        model = from_pretrained(run, best=False)
    _, (params, static) = _params_like(run)
    _, step30, _ = ckpt.restore(run, ckpt.LATEST, params, step=30)
    for x, y in zip(_leaves(eqx.filter(model, eqx.is_array)), _leaves(step30), strict=True):
        np.testing.assert_array_equal(x, y)
    best = ckpt.checkpoint_dir(run, ckpt.BEST) / str(ckpt.latest_step(run, ckpt.BEST))
    (best / ckpt.DIGEST_FILE).write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match=r"^no intact 'best' checkpoint .*its digests.json is unreadable"):
        from_pretrained(run)

    _truncate(_largest_file(latest / "30" / "train_state"))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != runlock.LOCK_FILE}
    with pytest.raises(ckpt.CheckpointError, match=r"^no intact 'latest' checkpoint in .*every one fails its check "
                                                   r"\(step 40: params/.*; step 30: train_state/"):
        Trainer(setup["config"], progress=False).fit(setup["corpus"], run_dir=run, resume=True)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != runlock.LOCK_FILE} == before


def test_checkpoints_without_digests_still_load(tmp_path):
    params = {"w": jax.numpy.arange(6.0).reshape(2, 3)}
    step_dir = ckpt.save(tmp_path, ckpt.LATEST, 5, params)
    (step_dir / ckpt.DIGEST_FILE).unlink()  # as written before digests existed (3db2249)
    assert ckpt.check(step_dir) is None
    step, restored, _ = ckpt.restore(tmp_path, ckpt.LATEST, {"w": jax.numpy.zeros((2, 3))})
    assert step == 5 and np.array_equal(restored["w"], params["w"])


def test_saving_is_idempotent_keeps_the_newest_and_clean_removes_leftovers(tmp_path):
    def tree(v: float) -> dict:
        return {"w": jax.numpy.full((4,), v)}

    for step in (10, 20, 30):
        ckpt.save(tmp_path, ckpt.LATEST, step, tree(step), keep=2)
    assert ckpt.steps(tmp_path, ckpt.LATEST) == [20, 30]
    ckpt.save(tmp_path, ckpt.LATEST, 30, tree(31.0), keep=2)  # the same step again: replaced, no error
    assert ckpt.restore(tmp_path, ckpt.LATEST, tree(0))[1]["w"].tolist() == [31.0] * 4
    ckpt.save(tmp_path, ckpt.LATEST, 25, tree(25.0), keep=2)  # a replay from an older step: 30 is stale
    assert ckpt.steps(tmp_path, ckpt.LATEST) == [20, 25]

    d = ckpt.checkpoint_dir(tmp_path, ckpt.LATEST)
    os.rename(d / "25", d / "25.old")  # killed between the two renames of a replacement
    for name in ("30.writing", "30.writing.orbax-checkpoint-tmp-1234", "20.deleting", "7.orbax-checkpoint-tmp-9"):
        (d / name).mkdir()
    (tmp_path / ".config.yaml.0a1b2c3d.tmp").write_text("half")
    (d / "notes").mkdir()  # not ours: kept
    removed = ckpt.clean(tmp_path)
    assert sorted(p.name for p in removed) == [".config.yaml.0a1b2c3d.tmp", "20.deleting", "30.writing",
                                               "30.writing.orbax-checkpoint-tmp-1234", "7.orbax-checkpoint-tmp-9"]
    assert sorted(p.name for p in d.iterdir()) == ["20", "25", "notes"]
    assert ckpt.check(d / "25") is None


# --------------------------------------------------------------------------------- write errors
@pytest.mark.slow
def test_a_full_disk_stops_with_one_message_and_resume_works_after(setup, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv(ckpt.FAULT_ENV, "latest:20:written:enospc")
    with pytest.raises(TrainingWriteError) as info:
        Trainer(setup["config"], progress=False).fit(setup["corpus"], run_dir=run)
    latest = ckpt.checkpoint_dir(run, ckpt.LATEST)
    assert str(info.value) == (
        f"could not save the latest checkpoint of step 20 to {str(latest / '20')!r}: [Errno 28] No space left on "
        f"device: {str(latest / '20.writing')!r}; the checkpoint of step 10 ({str(latest / '10')!r}) is intact: "
        "free space (or fix the cause), then resume with --resume")
    assert sorted(p.name for p in latest.iterdir()) == ["10"]  # the failed save left nothing behind
    monkeypatch.delenv(ckpt.FAULT_ENV)
    Trainer(setup["config"], progress=False).fit(setup["corpus"], run_dir=run, resume=True)
    _assert_same_run(run, setup["reference"])


@pytest.mark.slow
def test_a_failing_orbax_write_exits_1_with_one_line(setup, tmp_path):
    """A real write failure inside orbax (a 4 KiB file-size limit from the save of step 20 on:
    tensorstore's writes fail with EFBIG, as they would with ENOSPC), through the CLI."""
    run = tmp_path / "run"
    rc, err, _ = _attempt(setup, run, fault="latest:20:start:fsize")
    latest = ckpt.checkpoint_dir(run, ckpt.LATEST)
    assert rc == 1, err
    assert err.splitlines() == [
        f"Error: could not save the latest checkpoint of step 20 to {str(latest / '20')!r}: [Errno 27] File too "
        f"large; the checkpoint of step 10 ({str(latest / '10')!r}) is intact: free space (or fix the cause), "
        "then resume with --resume"], err
    rc, err, _ = _attempt(setup, run)
    assert rc == 0, err
    _assert_same_run(run, setup["reference"])


# --------------------------------------------------------------------------------- start-up
def test_an_empty_config_file_is_refused_naming_it(tmp_path):
    for name, text in (("empty.yaml", ""), ("comments.yaml", "# nothing set yet\n\n# lr: 1e-3\n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"^config file {str(path)!r} is empty \(no field is set\); "):
            Config.from_yaml(path)


@pytest.mark.slow
def test_an_empty_config_file_exits_2_with_one_line(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# only a comment\n")
    out = subprocess.run([str(EXE), "train", "--config", str(path), "--run_dir", str(tmp_path / "run")],
                         env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 2 and out.stderr.startswith(f"Error: config file {str(path)!r} is empty"), out.stderr
    assert out.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see when JAX is being loaded")
def test_sigterm_during_start_up_exits_143_saying_nothing_was_lost(setup, tmp_path):
    # 1. while JAX is being imported (before any command runs); 2. once fit has locked the new
    # run's directory, nothing written yet; 3. at the end of start-up: the run's files written,
    # the programs built, the loop not begun. 2 and 3 are held there by the test seam
    # (`startup:0:POINT:wait`), so the signal lands in start-up every time.
    for when in ("importing", "locked", "built"):
        run = tmp_path / when
        env = _env() if when == "importing" else _env(**{ckpt.FAULT_ENV: f"startup:0:{when}:wait"})
        proc = subprocess.Popen(_train_cmd(setup, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        if when == "importing":
            deadline = time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline and proc.poll() is None and "jaxlib" not in _maps(proc.pid):
                time.sleep(0.002)
        else:
            before = []  # what it said before reaching the seam (nothing is expected)
            for line in proc.stderr:
                if line == f"fault: startup:0:{when} waiting\n":
                    break
                before.append(line)
            assert proc.poll() is None, before
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 143, err
        if when == "importing":
            assert err == "interrupted by SIGTERM (no training step was running): nothing was lost\n"
            assert not run.exists()  # the same command again is a new run (the test above times one)
            continue
        else:
            assert "Traceback" not in err and before == [], (before, err)
            assert err.splitlines() == [
                "training interrupted by SIGTERM during start-up (before this session's first step); nothing was lost",
                "run the same command again to start it" if when == "locked" else
                f"resume with: dantinox-eqx train --config {run / 'config.yaml'} --run_dir {run} "
                f"--data_path {setup['corpus']} --resume"], err
            # nothing but the lock (locked) or the run's files (built) was written: no checkpoint
            assert not ckpt.steps(run, ckpt.LATEST) and not ckpt.steps(run, ckpt.BEST)
            assert (run / "config.yaml").exists() == (when == "built")
        rc, err, _ = _attempt(setup, run)  # then the same command (or --resume) finishes the run
        assert rc == 0, err
        _assert_same_run(run, setup["reference"])


# --------------------------------------------------------------------------------- permissions
def test_atomic_writes_get_the_mode_open_gives_under_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        files.atomic_write_text(tmp_path / "a.txt", "x")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        folder = files.make_temp_dir(tmp_path, "out")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o640
    assert folder.stat().st_mode & 0o777 == 0o750


@pytest.mark.slow
def test_run_directory_files_are_readable_under_umask_022(setup):
    """The reference run was trained under umask 022: every file 0644, every folder 0755,
    like a file made with open() (orbax's are), so others on the machine can read the run."""
    run = setup["reference"]
    modes = {str(p.relative_to(run)): p.stat().st_mode & 0o777 for p in run.rglob("*")}
    assert {"config.yaml", "tokenizer.json", "training_log.csv", "training_cursor.json", "model_summary.json",
            runlock.LOCK_FILE} <= set(modes)
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o755 if (run / p).is_dir() else 0o644)}
    assert wrong == {}
    assert json.loads((run / runlock.LOCK_FILE).read_text())["pid"] == os.getpid()
