"""Baby shape: the loss's forward + backward through the old path (whole logits, optax) vs the
new one (`features` + `token_loss`, nn/cross_entropy.py; plain at this vocabulary), interleaved
in one process: `PYTHONPATH=src python benchmarks/loss_ab.py [--repeats 200]`."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dantinox_eqx.config import Config  # noqa: E402
from dantinox_eqx.model import Transformer  # noqa: E402
from run import BABY  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200)
    a = ap.parse_args()
    cfg = Config(**BABY)
    params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    batch = jax.random.randint(jax.random.key(1), (cfg.batch_size, cfg.max_context + 1), 0, cfg.vocab_size)

    def old(p):
        logits, _ = eqx.combine(p, static)(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch[:, 1:]).mean()

    def new(p):
        model = eqx.combine(p, static)
        features, _ = model.features(batch[:, :-1])
        loss_sum, weight_sum = model.token_loss(features, batch[:, 1:])
        return loss_sum / weight_sum

    fns = {"old": jax.jit(jax.value_and_grad(old)), "new": jax.jit(jax.value_and_grad(new))}
    print("losses", {k: float(f(params)[0]) for k, f in fns.items()})
    times = {k: [] for k in fns}
    for _ in range(a.repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(params))
            times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        print(k, "median ms", round(1e3 * statistics.median(v), 2), "p10", round(1e3 * sorted(v)[len(v) // 10], 2))


if __name__ == "__main__":
    main()
