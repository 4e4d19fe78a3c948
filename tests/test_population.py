"""Populations (train/population.py, train/population_fit.py): member k of a population trains as
a separate `Trainer` run of its config, on 1 device and on 4 simulated devices (members split
over the devices), into an ordinary run directory; a population resumes exactly.

The acceptance tolerance: every column of training_log.csv but the timings, member against
separate run, within TOL. Measured on this 2-core CPU with the members below (20 steps, dropout
on, 2 micro-batches, each member its own seed, lr, warm-up, weight decay, betas and clipping):
max abs diff 4.8e-7 on 1 device (member 0 bitwise equal; vmap batches the matmuls, and XLA may
accumulate a batched matmul in another order) and 4.8e-7 on 4 devices; the lr column is bitwise.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli.main import app
from click.testing import CliRunner

from dantinox_eqx.config import SCHEDULES, Config, ConfigError
from dantinox_eqx.model import Transformer
from dantinox_eqx.run import checkpoint as ckpt
from dantinox_eqx.run.runlock import LOCK_FILE, RunLock, RunLockedError
from dantinox_eqx.train import population as pop
from dantinox_eqx.train.optim import make_optimizer, make_schedule
from dantinox_eqx.train.population_fit import fit_population, train_population
from dantinox_eqx.train.step import init_opt_state
from dantinox_eqx.train.trainer import LOG_COLUMNS, Trainer, read_log

from .conftest import TINY, plays_slice
from .procs import device_env

HERE = Path(__file__).parent
# The losses are about 2 to 5, where a float32 ulp is 2.4e-7 or 4.8e-7: the measured 4.8e-7 is
# one ulp. The member and the run differ only in the order XLA accumulates a (batched) matmul,
# a relative 1e-7-sized difference per operation that 20 steps of training carry forward; 1e-5
# (20 to 40 ulps) leaves room for kernels of another width (AVX2 vs AVX-512) without letting
# through anything else: another batch, key or hyper-parameter moves a loss by 1e-3 or more.
TOL = 1e-5
EXACT = [c for c in LOG_COLUMNS if c not in ("ms_per_step", "tokens_per_s")]
BASE = dict(TINY, vocab_size=None, max_steps=20, eval_interval=5, eval_iters=2, grad_accum=2, batch_size=2,
            dropout_rate=0.1, warmup_steps=5)
MEMBERS = [
    {"seed": 1},
    {"seed": 2, "lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0, "dropout_rate": 0.2},
    {"seed": 1, "beta1": 0.8, "beta2": 0.95, "grad_clip": 0.3, "lr": 1e-2},
    {"seed": 3, "lr": 5e-3, "min_lr_ratio": 0.2, "dropout_rate": 0.05},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("population")
    corpus = plays_slice(d / "corpus.txt", 30_000)
    base = Config(**BASE)
    base.to_yaml(d / "config.yaml")
    (d / "members.json").write_text(json.dumps(MEMBERS))
    return {"dir": d, "corpus": corpus, "base": base}


@pytest.fixture(scope="module")
def separate(setup) -> list[Path]:
    """Each member's config trained alone by the Trainer, on 1 device."""
    return [Trainer(setup["base"].replace(**m, n_devices=1), progress=False).fit(
        setup["corpus"], run_dir=setup["dir"] / f"separate{k}") for k, m in enumerate(MEMBERS)]


@pytest.fixture(scope="module")
def population(setup) -> list[Path]:
    return train_population(setup["base"], MEMBERS, setup["corpus"], setup["dir"] / "pop", progress=False)


def _rows(run: Path) -> list[dict]:
    return [{k: r[k] for k in EXACT} for r in read_log(run / "training_log.csv")]


def _max_diff(a: Path, b: Path) -> float:
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [5, 10, 15, 20]
    assert [r["lr"] for r in ra] == [r["lr"] for r in rb]  # the schedule, as fit computes it
    return max(abs(x[k] - y[k]) for x, y in zip(ra, rb) for k in EXACT)


def _params(run: Path, which: str) -> list[np.ndarray]:
    cfg = Config.from_yaml(run / "config.yaml")
    like = eqx.filter(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    return [np.asarray(x) for x in jax.tree.leaves(ckpt.restore(run, which, like)[1])]


def _loss(run: Path, which: str, tokens: jax.Array) -> float:
    """The mean next-token cross-entropy of checkpoint `which` of `run` on `tokens` (B, T + 1), no dropout."""
    cfg = Config.from_yaml(run / "config.yaml")
    params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    model = eqx.combine(ckpt.restore(run, which, params)[1], static)
    logits = model(tokens[:, :-1])[0].astype(jnp.float32)
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean())


def _distance(a: Path, b: Path) -> float:
    """Relative Frobenius distance between the latest weights of runs `a` and `b` (all leaves)."""
    x, y = (np.concatenate([w.ravel() for w in _params(r, ckpt.LATEST)]) for r in (a, b))
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


@pytest.mark.slow
def test_members_train_as_separate_runs(setup, separate, population):
    cfg = Config.from_yaml(population[0] / "config.yaml")
    tokens = jax.random.randint(jax.random.key(5), (8, cfg.max_context + 1), 0, cfg.vocab_size)
    diffs = [_max_diff(p, s) for p, s in zip(population, separate)]
    print("population vs separate runs, 1 device, max abs diff per member:", diffs)
    assert max(diffs) <= TOL
    for p, s in zip(population, separate):
        # An ordinary run directory: the same config and tokenizer bytes, the checkpoints of
        # the same weights (within the rows' tolerance), the cursor of a finished run.
        assert Config.from_yaml(p / "config.yaml") == Config.from_yaml(s / "config.yaml").replace(n_devices=0)
        assert (p / "tokenizer.json").read_bytes() == (s / "tokenizer.json").read_bytes()
        summary, alone = (json.loads((d / "model_summary.json").read_text()) for d in (p, s))
        assert summary["population"] == {"members": 4, "member": int(p.name[-1]), "devices": 1}
        assert {k: summary[k] for k in ("n_params", "weights_mem_MB", "optimizer_mem_MB")} == \
            {k: alone[k] for k in ("n_params", "weights_mem_MB", "optimizer_mem_MB")}
        cursor = json.loads((p / "training_cursor.json").read_text())
        assert cursor["finished"] and cursor["step"] == 20
        assert cursor["best_val_loss"] == min(r["val_loss"] for r in _rows(p))
        for which in (ckpt.LATEST, ckpt.BEST):
            assert ckpt.latest_step(p, which) == ckpt.latest_step(s, which)
            # The checkpoint holds the weights of the separate run: the loss they give a fixed
            # batch (what the log rows are about) agrees within the rows' TOL. Not the weights
            # element by element: where a gradient is about zero, Adam's m / sqrt(v) turns a
            # rounding difference into an lr-sized step (its sign flips), so a few elements
            # differ by up to ~lr per step; the loss does not feel them (its gradient there is
            # about zero). How much depends on the CPU's matmul kernels: under 1e-5 relative
            # (Frobenius) on an AVX2 machine, 2.3e-5 on an AVX-512 one (issue 24).
            loss_diff = abs(_loss(p, which, tokens) - _loss(s, which, tokens))
            print(f"{p.name} {which}: checkpoint loss diff {loss_diff:.2e}")
            assert loss_diff <= TOL
        # Still the weights of *this* member: its separate run is by far the nearest (relative
        # Frobenius distance to its own run < 1/100 of that to any other member's run).
        mine = _distance(p, s)
        others = [_distance(p, o) for o in separate if o != s]
        print(f"{p.name}: weights {mine:.2e} from its run, >= {min(others):.2e} from the others")
        assert mine < min(others) / 100, (mine, others)
    # The members really differ (their own seeds, rates and schedules).
    assert len({_rows(p)[-1]["val_loss"] for p in population}) == len(MEMBERS)


@pytest.mark.slow
def test_members_on_four_devices(setup, separate):
    out = setup["dir"] / "pop4"
    proc = _driver(setup, out, 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(out.glob("member_*"))
    assert [json.loads((r / "model_summary.json").read_text())["population"]["devices"] for r in runs] == [4] * 4
    diffs = [_max_diff(p, s) for p, s in zip(runs, separate)]
    print("population on 4 devices vs separate runs on 1, max abs diff per member:", diffs)
    assert max(diffs) <= TOL


def _driver(setup: dict, out: Path, devices: int, config: Path | None = None, members: Path | None = None,
            **env: str) -> subprocess.CompletedProcess:
    """tests/population_driver.py: the population in a process of its own on `devices` devices."""
    args = [config or setup["dir"] / "config.yaml", members or setup["dir"] / "members.json", setup["corpus"], out,
            devices]
    return subprocess.run([sys.executable, str(HERE / "population_driver.py"), *map(str, args)],
                          env=device_env(devices, **env), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_population_killed_inside_a_save_resumes_exactly(setup, population):
    """kill -9 inside member 1's save of step 10 (orbax has written its files, no digests yet:
    a real partial checkpoint on disk; member 0 saved step 10, members 2 and 3 not reached)
    leaves the members at different steps; the resume cleans the partial checkpoint up, brings
    1-3 up to 10, then trains all to 20 and writes the uninterrupted population's rows and
    weights bitwise (the same program and numbers)."""
    out = setup["dir"] / "crashed"
    proc = _driver(setup, out, 1, **{ckpt.FAULT_ENV: "latest:10:written:kill:member_0001"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]  # killed at the seam
    dirs = sorted(out.glob("member_*"))
    assert [ckpt.latest_step(d, ckpt.LATEST) for d in dirs] == [10, 5, 5, 5]
    partial = ckpt.checkpoint_dir(dirs[1], ckpt.LATEST) / "10.writing"
    assert (partial / "params").is_dir() and not (partial / ckpt.DIGEST_FILE).exists()  # half a checkpoint
    configs = [setup["base"].replace(**m) for m in MEMBERS]
    results = fit_population(configs, setup["corpus"], dirs, resume=True, progress=False)
    assert [r.status for r in results] == ["complete"] * 4
    assert not partial.exists()
    for d in dirs:  # the finished population released its locks
        with RunLock(d) as lock:
            assert lock.held
    for d, p in zip(dirs, population):
        assert _rows(d) == _rows(p)
        assert ckpt.steps(d, ckpt.LATEST) == ckpt.steps(p, ckpt.LATEST)
        for x, y in zip(_params(d, ckpt.LATEST), _params(p, ckpt.LATEST)):
            np.testing.assert_array_equal(x, y)


def test_a_member_directory_in_use_is_refused_before_anything_is_written(tmp_path, small_corpus):
    """One writer per run directory, for population members too (the Trainer's lock): a member
    directory another process trains refuses the whole population, naming the holder, and
    nothing is written; two members may not share a directory. The locks the population took
    before the refusal are released with it (and after a finished population: the test of a
    kill inside a save locks every member directory again after its resume)."""
    configs = [Config(**{**TINY, "vocab_size": None}, seed=s) for s in (1, 2)]
    dirs = [tmp_path / "pop" / "member_0000", tmp_path / "pop" / "member_0001"]
    for d in dirs:  # both exist: the population locks member 0's before it finds member 1's taken
        d.mkdir(parents=True)
    with RunLock(dirs[1]):  # another open file description: flock refuses it as another process
        with pytest.raises(RunLockedError, match=rf"^run_dir: '{dirs[1]}' is in use by another training run "
                                                 rf"\(process {os.getpid()} on host"):
            fit_population(configs, small_corpus, dirs, progress=False)
    assert [p.name for p in dirs[1].iterdir()] == [LOCK_FILE]
    assert {p.name for p in dirs[0].iterdir()} <= {LOCK_FILE}  # nothing written (at most its lock)
    with RunLock(dirs[0]) as lock:  # released on the refusal
        assert lock.held
    with pytest.raises(ConfigError, match=r"^run_dirs: two members share a run directory"):
        fit_population(configs, small_corpus, [dirs[0], dirs[0]], progress=False)


# ---------------------------------------------------------------------------------------- fast
def test_schedules_with_traced_numbers_match_the_plain_ones():
    steps = jnp.arange(0, 60)
    for name in SCHEDULES:
        for lr, warmup, ratio in ((3e-3, 10, 0.01), (1e-3, 0, 0.1)):
            plain = jax.jit(make_schedule(name, lr, warmup, 50, ratio, 0.4))(steps)
            traced = jax.jit(lambda v: make_schedule(name, v[0], v[1].astype(jnp.int32), 50, v[2], v[3])(steps))(
                jnp.asarray([lr, warmup, ratio, 0.4]))
            # lo = lr * min_lr_ratio and friends: float32 products here, double-precision
            # constants in a plain run: a few float32 ulps apart.
            np.testing.assert_allclose(traced, plain, rtol=1e-6, err_msg=f"{name} {lr} {warmup}")


@pytest.mark.parametrize("members, message", [
    ([], r"^population: needs at least 1 member, got 0"),
    ([{}, {"dim": 64, "n_heads": 8}], r"^dim: member 1 has dim=64, member 0 32; the members of one population share"),
    ([{}, {"batch_size": 8}], r"^batch_size: member 1 has batch_size=8"),
    ([{"grad_clip": 1.0}, {"grad_clip": 0.0}], r"^grad_clip: member 1 has grad_clip=0.0, member 0 1.0; clipping on"),
    ([{"dropout_rate": 0.0}, {"dropout_rate": 0.1}], r"^dropout_rate: .*dropout on or off changes the compiled step"),
    ([{"use_lora": True, "init_from": "x"}], r"^use_lora: a population cannot train with use_lora"),
])
def test_members_that_cannot_share_a_program(members, message, small_corpus, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train_population(Config(**TINY), members, small_corpus, tmp_path / "pop")
    assert not (tmp_path / "pop").exists()


def test_memory_estimate_refuses_a_population_too_large(small_corpus, tmp_path):
    mesh = pop.population_mesh(3)
    limit, _ = pop.device_memory(mesh.devices.flat[0])
    pop.check_memory(3, limit // 3, mesh)  # fits
    with pytest.raises(ConfigError, match=rf"^--population: 3 members need about {3 * (limit // 2):,} bytes "
                                          rf"\(3 x {limit // 2:,}: parameters \+ optimizer state \+ activations\)"):
        pop.check_memory(3, limit // 2, mesh)
    # Estimated from shapes before any member is built: a large model times many members.
    big = Config(**{**TINY, "vocab_size": None, "dim": 4096, "n_heads": 32, "head_size": 128, "num_blocks": 48})
    with pytest.raises(ConfigError, match=r"^--population: 64 members need about [\d,]+ bytes"):
        train_population(big, [{"seed": s} for s in range(64)], small_corpus, tmp_path / "pop")
    assert not (tmp_path / "pop").exists()


@pytest.mark.slow
def test_memory_estimate_against_the_measured_memory(setup, tmp_path):
    """The estimate check_population_memory refuses by (member_bytes: parameters + optimizer
    state + activations, from shapes), against memory measured once: the peak resident memory
    of a population process of 4 members minus that of 1 member (the same program, the same
    runtime and corpus: the difference is 3 members' arrays and the step's buffers for them).
    A model large enough (7M parameters) that those dwarf the RSS noise of a process (a few MB).
    Bound: the measured 3 members lie between 1x and 3.5x the estimate. Not below: the estimate
    leaves out gradients and the update (XLA's buffers for them), so the real need is above it.
    Not above 3.5x: a step holds at most 6 parameter-sized arrays per member (params in and out,
    gradients, the update, Adam's two moments) where the estimate counts 3 (params and the two
    moments), and activations both count: 2x; XLA's temporaries of the vmapped update and the
    allocator's kept pages (freed, not returned) add up to three quarters more: 3.5x.
    Measured with VmHWM (tests/population_driver.py): 2.29x and 2.49x here. (ru_maxrss read 1.8-2.0x on
    one machine and 0 on another: it carries the pytest worker's high-water mark over exec.)
    the estimate is a lower bound, about 40 % of what a member really takes."""
    config = setup["base"].replace(dim=384, n_heads=6, head_size=64, num_blocks=4, max_steps=2, eval_interval=2,
                                   eval_iters=1, dropout_rate=0.0, grad_accum=1, batch_size=4)
    config.to_yaml(tmp_path / "big.yaml")
    rss = {}
    for n in (1, 4):
        (tmp_path / f"m{n}.json").write_text(json.dumps([{"seed": k} for k in range(n)]))
        proc = _driver(setup, tmp_path / f"pop{n}", 1, tmp_path / "big.yaml", tmp_path / f"m{n}.json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        rss[n] = int(proc.stdout.split("maxrss_bytes ")[-1])
    resolved = Config.from_yaml(tmp_path / "pop1" / "member_0000" / "config.yaml")
    params = eqx.filter(Transformer(resolved, key=jax.random.key(0)), eqx.is_array)
    per = pop.member_bytes(resolved, params, init_opt_state(make_optimizer(resolved, 1), params))
    measured = rss[4] - rss[1]
    print(f"3 members: measured {measured:,} bytes (peak RSS {rss[4]:,} - {rss[1]:,}), estimated {3 * per:,} "
          f"(ratio {measured / (3 * per):.2f})")
    assert 3 * per <= measured <= 3.5 * 3 * per


# ---------------------------------------------------------------------------------------- find-lr
@pytest.mark.slow
def test_find_lr_population_trains_each_rate_as_fit_would(setup, tmp_path):
    cfg = setup["dir"] / "config.yaml"
    out = CliRunner().invoke(app, ["find-lr", "--config", str(cfg), "--data_path", str(setup["corpus"]),
                                   "--population", "4", "--min_lr", "1e-5", "--max_lr", "1e-2", "--num_steps", "30",
                                   "--plot", "--out_dir", str(tmp_path / "lr")])
    assert out.exit_code == 0, out.output
    with open(tmp_path / "lr" / "lr_population.csv") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    assert [r["lr"] for r in rows] == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2])
    assert (tmp_path / "lr" / "lr_population.png").stat().st_size > 0
    best = min(rows, key=lambda r: r["val_loss"])
    assert f"Best LR: {best['lr']:.2e}" in out.output
    # The best member is the run `fit` trains with that lr for 30 steps (warm-up capped at 3).
    # (Not at lr 0.1: there this tiny model's training is chaotic, and float32 rounding
    # differences grow to 0.03 in 30 steps, the member and the separate run alike.)
    alone = Trainer(setup["base"].replace(lr=best["lr"], max_steps=30, warmup_steps=3, eval_interval=30),
                    progress=False).fit(setup["corpus"], run_dir=tmp_path / "alone")
    assert abs(read_log(alone / "training_log.csv")[-1]["val_loss"] - best["val_loss"]) <= TOL


def test_find_lr_population_refuses_bad_sizes(small_corpus, tmp_path):
    cfg = tmp_path / "c.yaml"
    Config(**{**TINY, "vocab_size": None}).to_yaml(cfg)
    base = ["find-lr", "--config", str(cfg), "--data_path", str(small_corpus), "--plot", "--out_dir",
            str(tmp_path / "o")]
    for extra, message in ((["--population", "0"], "Error: --population: the number of learning rates must be at "
                                                    "least 1, got 0"),
                           (["--population", "64", "--dim", "4096", "--n_heads", "32", "--head_size", "128",
                             "--num_blocks", "48"], "Error: --population: 64 members need about ")):
        out = CliRunner().invoke(app, base + extra)
        errors = [line for line in out.output.splitlines() if line.startswith("Error:")]
        assert out.exit_code == 2 and len(errors) == 1 and errors[0].startswith(message), out.output
        assert "Traceback" not in out.output
    assert not (tmp_path / "o").exists()
