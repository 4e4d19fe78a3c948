"""Causal key blocks in attention (`nn/attention.attend_causal`) on and off, interleaved in one
process: a dim-128, 4-block model's training step at context T (issue 25).

    PYTHONPATH=src python benchmarks/causal_blocks_ab.py [--context 256] [--rounds 10]

"off" replaces `attend_causal` by the whole-mask `attend` before its step is traced (the only
difference between the two compiled programs). Each round runs 10 steps of each arm, their
order alternating; prints and writes the median ms/step per arm and the first loss of each
(equal up to float32 summation order) to benchmarks/results/causal_blocks_T<context>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax

import dantinox_eqx.nn.attention as attention
from dantinox_eqx.config import Config
from dantinox_eqx.files import atomic_write_text
from dantinox_eqx.hostmem import keep_freed_memory
from dantinox_eqx.model import Transformer
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]


def arm(cfg: Config, T: int):
    """A zero-argument callable running 10 steps (one batch each) of a fresh model; its loss."""
    params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    opt = make_optimizer(cfg, cfg.max_steps)
    state = {"p": params, "s": init_opt_state(opt, params)}
    step = make_train_step(static, opt)
    batches = [jax.random.randint(jax.random.key(i), (1, cfg.batch_size, T + 1), 0, cfg.vocab_size) for i in range(10)]

    def run():
        for b in batches:
            state["p"], state["s"], m = step(state["p"], state["s"], b, jax.random.key(0))
        return m["loss"]

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    keep_freed_memory()
    T = a.context
    cfg = Config(dim=128, n_heads=4, head_size=32, num_blocks=4, max_context=T, batch_size=8, use_swiglu=False,
                 expansion=4, dropout_rate=0.0, lr=1e-3, warmup_steps=10, max_steps=1000, vocab_size=65)
    blocks = attention.attend_causal
    entries, first_loss = {}, {}
    for name, fn in (("off", lambda q, k, v, m, block=0: attention.attend(q, k, v, m)), ("on", blocks)):
        attention.attend_causal = fn  # read when the step is traced, i.e. at its first call
        entries[name] = arm(cfg, T)
        first_loss[name] = float(entries[name]())
    attention.attend_causal = blocks
    times = {n: [] for n in entries}
    for r in range(a.rounds):
        for n in (("off", "on") if r % 2 == 0 else ("on", "off")):
            t = time.perf_counter()
            jax.block_until_ready(entries[n]())
            times[n].append(100 * (time.perf_counter() - t))  # ms per step (10 steps)
    med = {n: round(statistics.median(v), 2) for n, v in times.items()}
    res = {"what": "training step ms, causal key blocks off / on, interleaved", "context": T,
           "shape": "dim 128, 4 blocks, batch 8", "rounds": a.rounds, "median_ms_per_step": med,
           "on_over_off": round(med["on"] / med["off"], 3), "loss_after_10_steps": first_loss,
           "load_avg_1min": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M")}
    atomic_write_text(ROOT / "benchmarks" / "results" / f"causal_blocks_T{T}.json", json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
