"""Sweeps in one compiled program: `sweep --backend population` against `--backend local`.

    python benchmarks/population.py [--quick] [--steps 300] [--lrs 8] [--shapes tiny,baby]

Two measurements per shape (tiny: the tests' model, dim 32, 2 blocks, context 16, batch 4; baby:
nanoGPT's shakespeare_char shape, dim 128, 4 blocks, context 64, batch 12), on the default corpus:

1. Sweep wall time, side by side in one run: the same grid of `--lrs` learning rates (log-spaced
   1e-4..1e-2) x `--steps` steps through `run_local_sweep` (one Trainer run after another, each
   compiling its own step) and through `run_population_sweep` (one population, one compile),
   from the call to the written sweep_results.csv; plus the largest difference of a trial's final
   val_loss between the two (the backends must agree: tests/test_population.py's tolerance).
2. Per-member ms/step of the population step alone (the jitted, vmapped step, batches sampled
   inside, as the population trains) at N = 1, 2, 4, 8 members: the median over timed steps of
   the step's wall time divided by N, after warm-up, in rounds interleaved with the others; with
   the plain Trainer step (N = 1, no vmap) as the reference.

Results: benchmarks/results/population_<machine>.json and a printed table. `nox -s benchmarks`
runs it after the main matrix (`--quick` there: 60 steps, 4 timed rounds of 10 steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dantinox_eqx.config import Config, atomic_write_text  # noqa: E402
from dantinox_eqx.data.corpus import default_corpus_path  # noqa: E402
from dantinox_eqx.data.sampling import prepare_data, sample_batch  # noqa: E402
from dantinox_eqx.hostmem import keep_freed_memory  # noqa: E402
from dantinox_eqx.model import Transformer  # noqa: E402
from dantinox_eqx.tools import sweep as sw  # noqa: E402
from dantinox_eqx.tools.population_sweep import run_population_sweep  # noqa: E402
from dantinox_eqx.tools.sweep_config import parse_sweep_config  # noqa: E402
from dantinox_eqx.train import population as pop  # noqa: E402
from dantinox_eqx.train.optim import make_optimizer  # noqa: E402
from dantinox_eqx.train.step import init_opt_state, make_train_step  # noqa: E402
from run import BABY, machine_name  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TINY = dict(dim=32, n_heads=4, head_size=8, num_blocks=2, max_context=16, batch_size=4, expansion=2,
            warmup_steps=30, dropout_rate=0.0)
SHAPES = {"tiny": TINY, "baby": {k: v for k, v in BABY.items() if k not in ("max_steps", "vocab_size")}}


def sweep_walls(name: str, shape: dict, lrs: list[float], steps: int, corpus: Path, folder: Path) -> dict:
    """Wall seconds of the same lr grid through the local and the population backend."""
    base = Config(**{**shape, "vocab_size": None, "max_steps": steps, "eval_interval": steps // 3 or 1,
                     "eval_iters": 10, "warmup_steps": min(shape.get("warmup_steps", 30), steps // 10)})
    spec = parse_sweep_config({"method": "grid", "metric": {"name": "val_loss", "goal": "minimize"},
                               "parameters": {"lr": {"values": lrs}}})
    quiet = lambda message: None  # noqa: E731
    t0 = time.perf_counter()
    local = sw.run_local_sweep(spec, base, corpus, folder / f"{name}-local", len(lrs), sw.trainer_train_fn, log=quiet)
    t1 = time.perf_counter()
    together = run_population_sweep(spec, base, corpus, folder / f"{name}-population", len(lrs), log=quiet)
    t2 = time.perf_counter()
    a = {r["trial"]: r["metric"] for r in local}
    b = {r["trial"]: r["metric"] for r in together}
    assert len(a) == len(b) == len(lrs), (local, together)
    return {"shape": name, "trials": len(lrs), "steps": steps, "local_s": round(t1 - t0, 2),
            "population_s": round(t2 - t1, 2), "speedup": round((t1 - t0) / (t2 - t1), 2),
            "max_val_loss_diff": max(abs(a[t] - b[t]) for t in a),
            "val_loss_diff_by_lr": {f"{r['params']['lr']:.2e}": abs(a[r['trial']] - b[r['trial']]) for r in local}}


def _population_step(cfg: Config, n: int, data) -> Callable:
    lrs = np.geomspace(1e-4, 1e-2, n)
    configs = [cfg.replace(lr=float(lr)) for lr in lrs]
    mesh = pop.population_mesh(n)
    root = jax.random.key(cfg.seed)
    model = Transformer(cfg, key=jax.random.split(root, 4)[0])
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = init_opt_state(make_optimizer(cfg, 1000), params)
    programs = pop.build_population_programs(cfg, static, None, data, mesh, 1000)
    state = [pop.stack([params] * n, mesh), pop.stack([opt_state] * n, mesh)]
    values, roots = pop.place(pop.member_values(configs), mesh), pop.stack([root] * n, mesh)
    active = np.ones(n, bool)

    def step(s: int):
        state[0], state[1], metrics = programs.step(state[0], state[1], values, roots, roots,
                                                    np.full(n, s, np.int32), active)
        return metrics

    return step


def _plain_step(cfg: Config, data) -> Callable:
    params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    optimizer = make_optimizer(cfg, 1000)
    train_step = make_train_step(static, optimizer)
    tokens = jax.numpy.asarray(data.train)
    state = [params, init_opt_state(optimizer, params)]

    @jax.jit
    def sampled(p, o, s):  # the batch sampled inside, as the Trainer's fused step does
        batch = sample_batch(tokens, jax.random.fold_in(jax.random.key(1), s), cfg.batch_size, cfg.max_context)
        return train_step(p, o, batch, jax.random.fold_in(jax.random.key(2), s))

    def step(s: int):
        state[0], state[1], metrics = sampled(state[0], state[1], s)
        return metrics

    return step


def per_member(name: str, shape: dict, sizes: list[int], rounds: int, per_round: int, data) -> dict:
    """Median ms/step of the plain step and of the population step at each N, timed in rounds
    interleaved across them (a shared machine's speed drifts: each gets every phase), one sync
    per step, after compilation and warm-up; per member = the population step's time / N."""
    cfg = Config(**{**shape, "vocab_size": data.vocab_size})
    steps = {"plain": _plain_step(cfg, data), **{n: _population_step(cfg, n, data) for n in sizes}}
    for step in steps.values():
        for s in range(3):  # compile and warm up
            jax.block_until_ready(step(s))
    times: dict = {k: [] for k in steps}
    for r in range(rounds):
        for k, step in steps.items():
            for i in range(per_round):
                t = time.perf_counter()
                jax.block_until_ready(step(3 + r * per_round + i))
                times[k].append(time.perf_counter() - t)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    out = {"shape": name, "plain_step_ms": round(ms["plain"], 3)}
    for n in sizes:
        out[f"N={n}"] = {"step_ms": round(ms[n], 3), "per_member_ms": round(ms[n] / n, 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="60 steps per trial, 4 rounds of 10 timed steps")
    ap.add_argument("--steps", type=int, default=None, help="steps of each sweep trial [300; quick 60]")
    ap.add_argument("--lrs", type=int, default=8, help="learning rates in the sweep")
    ap.add_argument("--shapes", default="tiny,baby", help="comma-separated: tiny, baby")
    ap.add_argument("--no-sweep", action="store_true", help="only the per-member ms/step")
    args = ap.parse_args()
    keep_freed_memory()
    steps = args.steps or (60 if args.quick else 300)
    rounds, per_round = (4, 10) if args.quick else (5, 20)
    corpus = default_corpus_path()
    lrs = [float(x) for x in np.geomspace(1e-4, 1e-2, args.lrs)]
    out = {"machine": machine_name(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "sweeps": [], "per_member": []}
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if not args.no_sweep:
                r = sweep_walls(name, SHAPES[name], lrs, steps, corpus, Path(tmp))
                out["sweeps"].append(r)
                print(f"{name}: {r['trials']} lrs x {steps} steps: local {r['local_s']} s, population "
                      f"{r['population_s']} s ({r['speedup']}x); val_loss max diff {r['max_val_loss_diff']:.2e}",
                      flush=True)
            data = prepare_data(corpus, tokenizer_type="char", max_context=SHAPES[name]["max_context"])
            r = per_member(name, SHAPES[name], [1, 2, 4, 8], rounds, per_round, data)
            out["per_member"].append(r)
            cells = ", ".join(f"{k} {v['per_member_ms']} ms" for k, v in r.items() if k.startswith("N="))
            print(f"{name}: per-member ms/step: plain step {r['plain_step_ms']} ms; {cells}", flush=True)
    name = "population_" + machine_name() + ("-quick" if args.quick else "")
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / (name + '.json')}")


if __name__ == "__main__":
    main()
