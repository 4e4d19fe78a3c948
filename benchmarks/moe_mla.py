"""Train-step speed of dense vs MoE (dropless and capacity 1.25) vs MLA at similar active size.

    PYTHONPATH=src python benchmarks/moe_mla.py [--steps 20] [--rounds 3] [--batch 12] [--out FILE]

The baby shape (4 blocks, dim 128, 4 heads of 32, context 64, vocab 256, float32, batch 12),
with the pure jitted train step (`step.make_train_step`, AdamW, one micro-batch):
- dense: SwiGLU MLP of width 4 * dim;
- moe_dropless / moe_cf1.25: 4 experts of width 2 * dim, top-2 routing: the same active MLP
  width as dense (2 x 256 = 512 hidden units per token) with twice its MLP parameters;
  capacity_factor 0 (dropless slot buffers: every expert runs on all N tokens) and 1.25
  (ceil(1.25 * N * 2 / 4) slots per expert);
- mla: dense MLP, MLA attention with down_dim_q = down_dim_kv = 64, rope_dim 16 (63,488
  attention parameters per block against dense's 65,536), trained in the naive form.

Timing: each variant is compiled and warmed up (2 steps), then `--rounds` rounds each time
`--steps` steps of every variant in turn (interleaved, so load drift on a shared machine hits
all variants alike); ms/step is the median over all timed steps, tokens/s = batch * context /
(ms/step). Also reported: total and active parameters, the FLOPs-per-token estimates of
model_summary.json (useful and executed) and the KV-cache bytes per token per layer.
Prints a table and writes benchmarks/results/moe_mla_<hostname>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax

from dantinox_eqx.config import Config
from dantinox_eqx.data.sampling import sample_batch
from dantinox_eqx.model import Transformer
from dantinox_eqx.run.summary import model_summary
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(num_blocks=4, dim=128, n_heads=4, head_size=32, max_context=64, vocab_size=256,
             expansion=4, lr=1e-3, warmup_steps=2, dropout_rate=0.0)
MOE = dict(use_moe=True, n_experts=4, top_k_mlp=2, expansion=2)
VARIANTS = {
    "dense": {},
    "moe_dropless": {**MOE, "capacity_factor": 0.0},
    "moe_cf1.25": {**MOE, "capacity_factor": 1.25},
    "mla": dict(mla=True, down_dim_q=64, down_dim_kv=64, rope_dim=16),
}


class Variant:
    """One model's compiled step, state and batches."""

    def __init__(self, name: str, cfg: Config, n_batches: int):
        self.name, self.cfg = name, cfg
        params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
        opt = make_optimizer(cfg, 10_000)
        self.params, self.state = params, init_opt_state(opt, params)
        self.summary = model_summary(cfg, params, self.state)
        self.step = make_train_step(static, opt, alpha_balance=cfg.alpha_balance)
        tokens = jax.random.randint(jax.random.key(1), (200_000,), 0, cfg.vocab_size)
        self.batches = [sample_batch(tokens, jax.random.key(s), cfg.batch_size, cfg.max_context)
                        for s in range(n_batches)]
        self.i, self.times = 0, []

    def run(self, n: int, record: bool = True) -> None:
        for _ in range(n):
            batch = self.batches[self.i % len(self.batches)]
            t = time.perf_counter()
            self.params, self.state, m = self.step(self.params, self.state, batch, jax.random.key(self.i))
            jax.block_until_ready(m)
            if record:
                self.times.append(time.perf_counter() - t)
            self.i += 1

    def result(self) -> dict:
        ms = 1000.0 * statistics.median(self.times)
        s = self.summary
        return {"ms_per_step": round(ms, 3), "tokens_per_s": round(self.cfg.tokens_per_step / (ms / 1000.0), 1),
                "ms_per_step_min": round(1000.0 * min(self.times), 3), "timed_steps": len(self.times),
                "n_params_total": s["n_params_total"], "n_params_active": s["n_params_active"],
                "flops_per_token": s["flops_per_token"], "flops_per_token_executed": s["flops_per_token_executed"],
                "kv_cache_bytes_per_token_per_layer": s["kv_cache_bytes_per_token_per_layer"],
                "overrides": VARIANTS[self.name]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    load_before = os.getloadavg()
    variants = []
    for name, kw in VARIANTS.items():
        v = Variant(name, Config(**{**SHAPE, "batch_size": args.batch, **kw}), n_batches=8)
        t = time.perf_counter()
        v.run(2, record=False)  # compile + warm-up
        print(f"{name}: compiled and warmed up in {time.perf_counter() - t:.1f} s", flush=True)
        variants.append(v)
    for _ in range(args.rounds):
        for v in variants:
            v.run(args.steps)
    results = {v.name: v.result() for v in variants}

    dense_ms = results["dense"]["ms_per_step"]
    print(f"\nbaby shape {SHAPE['num_blocks']} blocks, dim {SHAPE['dim']}, context {SHAPE['max_context']}, "
          f"batch {args.batch}; {jax.devices()[0].platform}; median of {args.rounds * args.steps} steps")
    print(f"{'variant':<14}{'ms/step':>9}{'tok/s':>10}{'x dense':>9}{'params':>10}{'active':>10}"
          f"{'MFLOP/tok':>11}{'exec':>8}{'KV B/tok/L':>12}")
    for name, r in results.items():
        print(f"{name:<14}{r['ms_per_step']:>9.2f}{r['tokens_per_s']:>10.0f}{r['ms_per_step'] / dense_ms:>9.2f}"
              f"{r['n_params_total']:>10}{r['n_params_active']:>10}{r['flops_per_token'] / 1e6:>11.2f}"
              f"{r['flops_per_token_executed'] / 1e6:>8.2f}{r['kv_cache_bytes_per_token_per_layer']:>12}")

    record = {"host": socket.gethostname(), "platform": platform.platform(), "jax": jax.__version__,
              "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "shape": {**SHAPE, "batch_size": args.batch}, "steps": args.steps, "rounds": args.rounds,
              "results": results}
    out = args.out or ROOT / "benchmarks" / "results" / f"moe_mla_{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
