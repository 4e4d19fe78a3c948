"""Host-side loading vs the fused in-step sampler: step time on the baby shape, in one run.

    python benchmarks/loader.py [--steps 20] [--rounds 20] [--tokens 2000000] [--shape baby|tiny]

Both feeds train the same model from the same init through the Trainer's own code path
(`feeds.make_feed` + the step `_Loop` builds: `feed.train_batch` inside the sharded step):

- fused: the token array placed on the device, windows sampled inside the compiled step;
- host:  a prepared dataset directory (written to a temporary folder: shards of uint16 ids,
         cut at 256k tokens so windows also cross shard boundaries), windows read from the
         memory maps by `HostFeed`'s background thread, 2 steps ahead.

Timing as the Trainer runs: steps dispatched back to back, one sync at the end of a round;
ms/step = round wall time / steps. The rounds of the two feeds are interleaved, in alternating
order (a slow spell on a shared machine hits both): reported are the fastest round of each, the
median over rounds of the paired ratio host / fused (round i of each), and the CPU time of the
process per step (all its threads: XLA's, and the host feed's reader), which other tenants of
a shared machine disturb less than wall time. Data share = the time to
make one batch alone (host: `HostFeed.batch_at`, read + placement; fused: the jitted sampler)
over the step time; the host feed's share overlaps the step (it runs in its thread).
Results go to benchmarks/results/loader_<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run import BABY, RESULTS, machine_name  # noqa: E402
from tests.prepared import write_ids  # noqa: E402

from dantinox_eqx.config import Config, atomic_write_text  # noqa: E402
from dantinox_eqx.data import feeds, tokens  # noqa: E402
from dantinox_eqx.hostmem import keep_freed_memory  # noqa: E402
from dantinox_eqx.model import Transformer  # noqa: E402
from dantinox_eqx.parallel import sharding
from dantinox_eqx.train.optim import make_optimizer  # noqa: E402
from dantinox_eqx.train.step import init_opt_state, make_train_step  # noqa: E402

SHARD_TOKENS = 1 << 18
# The tests' tiny model (sub-millisecond steps): where a per-step host cost shows most.
TINY = dict(BABY, dim=32, n_heads=4, head_size=8, num_blocks=2, max_context=16, batch_size=4, expansion=2)


def build(feed_kind: str, splits: tokens.Splits, cfg: Config, mesh, root):
    """What `trainer._Loop` builds: the feed, and the sharded step taking the feed's argument."""
    _, data_key, dropout_key, eval_key = jax.random.split(root, 4)
    model = Transformer(cfg, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    opt = make_optimizer(cfg, cfg.max_steps)
    state = init_opt_state(opt, params)
    params, state = sharding.place(params, state, mesh, "dp")
    feed = feeds.make_feed(feed_kind, splits, cfg, mesh, data_key, eval_key)
    step_fn = make_train_step(static, opt, donate=False)
    batch_sharding = sharding.batch_sharding(mesh, 1)

    def train_step(params, opt_state, data, step):
        batch = jax.lax.with_sharding_constraint(feed.train_batch(data, step), batch_sharding)
        return step_fn(params, opt_state, batch, jax.random.fold_in(dropout_key, step))

    step = sharding.shard_train_step(train_step, mesh, params, state,
                                     data_shardings=(feed.sharding, NamedSharding(mesh, P())))
    return {"kind": feed_kind, "feed": feed, "step": step, "params": params, "state": state, "at": 0,
            "rounds": [], "cpu": []}


def run_round(b: dict, steps: int) -> None:
    feed, step, params, state, s0 = b["feed"], b["step"], b["params"], b["state"], b["at"]
    feed.start(s0, s0 + steps)
    t, cpu = time.perf_counter(), time.process_time()
    for s in range(s0, s0 + steps):
        params, state, metrics = step(params, state, feed.train_arg(s), s)
    jax.block_until_ready(metrics)
    b["rounds"].append((time.perf_counter() - t) / steps)
    b["cpu"].append((time.process_time() - cpu) / steps)
    feed.close()
    b.update(params=params, state=state, at=s0 + steps, loss=float(metrics["loss"]))


def data_time(b: dict) -> float:
    """Seconds to make one batch alone (median of 50)."""
    feed = b["feed"]
    if b["kind"] == "host":
        make = feed.batch_at
    else:
        sampler = jax.jit(feed.train_batch)
        make = lambda s: sampler(feed.train_tokens, s)
    jax.block_until_ready(make(0))
    times = []
    for s in range(1, 51):
        t = time.perf_counter()
        jax.block_until_ready(make(s))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="steps per round")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=2_000_000, help="tokens of the synthetic corpus")
    ap.add_argument("--shape", choices=("baby", "tiny"), default="baby")
    args = ap.parse_args()
    keep_freed_memory()
    cfg = Config(**(BABY if args.shape == "baby" else TINY))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size - 1, args.tokens).astype(np.uint16)
    mesh, root = sharding.make_mesh(1), jax.random.key(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = tokens.open_splits(write_ids(Path(tmp) / "ds", ids, SHARD_TOKENS), cfg)
        raw = tokens.Splits(tokens.TokenStream([ids[:len(prepared.train)]], [0.0]),
                            tokens.TokenStream([ids[len(prepared.train):]], [0.0]), prepared.tokenizer)
        benches = [build("fused", raw, cfg, mesh, root), build("host", prepared, cfg, mesh, root)]
        for b in benches:  # compile and warm up
            run_round(b, 5)
            b["rounds"].clear()
            b["cpu"].clear()
        for i in range(args.rounds):
            for b in (benches if i % 2 == 0 else benches[::-1]):
                run_round(b, args.steps)
        out = {"machine": machine_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "shape": args.shape,
               "steps_per_round": args.steps, "rounds": args.rounds, "corpus_tokens": args.tokens}
        for b in benches:
            ms, data_ms = 1e3 * min(b["rounds"]), 1e3 * data_time(b)
            rounds = [round(1e3 * r, 2) for r in b["rounds"]]
            cpu_ms = 1e3 * statistics.median(b["cpu"])
            out[b["kind"]] = {"ms_per_step": round(ms, 2), "ms_per_step_median": round(statistics.median(rounds), 2),
                              "cpu_ms_per_step_median": round(cpu_ms, 2), "ms_per_step_rounds": rounds,
                              "data_ms": round(data_ms, 3), "data_share_pct": round(100 * data_ms / ms, 2),
                              "final_loss": b["loss"]}
            print(f"{b['kind']:6s} fastest round {ms:7.2f} ms/step, median {statistics.median(rounds):7.2f}, CPU "
                  f"{cpu_ms:7.2f} ms/step; one batch alone {data_ms:.3f} ms = {100 * data_ms / ms:.2f}% of a step")
    fused, host = benches
    out["host_over_fused"] = {
        "fastest_round": round(out["host"]["ms_per_step"] / out["fused"]["ms_per_step"], 4),
        "median_paired_round": round(statistics.median(h / f for h, f in zip(host["rounds"], fused["rounds"])), 4),
        "cpu_median": round(out["host"]["cpu_ms_per_step_median"] / out["fused"]["cpu_ms_per_step_median"], 4)}
    print(f"host / fused: {out['host_over_fused']}")
    name = f"loader_{machine_name()}" + ("" if args.shape == "baby" else f"_{args.shape}")
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
