"""Peak RSS and ms/step of a training step with a 49152-token vocabulary, plain vs chunked loss.

    python benchmarks/ce_memory.py                # the driver: interleaved runs, writes the JSON
    python benchmarks/ce_memory.py --one --loss_chunk -1 --steps 5   # one measured process

The driver runs each setting in its own process under `/usr/bin/time -v` (peak RSS of the whole
process: the XLA buffers included) and alternates them, `--rounds` times:
- `big`: a small model (dim 128, 2 blocks, tied embeddings) with SmolLM2's 49152-token
  vocabulary at batch 8 x 256 = 2048 tokens, whose float32 logits are 402 MB: loss_chunk -1
  (plain, the logits whole) vs 0 (auto: chunks of 1024 tokens).
- `baby`: benchmarks/run.py's baby shape (vocab 65), where auto does not chunk, with this
  checkout's code against the checkout named by `--before` (e.g. /work/main), to check that
  the loss's new path costs nothing there.
Results: benchmarks/results/ce_memory_<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIG = dict(dim=128, n_heads=4, head_size=32, num_blocks=2, max_context=256, batch_size=8, vocab_size=49152,
           weight_tying=True, use_swiglu=True, dropout_rate=0.0, lr=1e-3, warmup_steps=10, max_steps=100)


def one(shape: str, loss_chunk: int, steps: int) -> dict:
    """Build, compile and time `steps` steps in this process; the driver reads its peak RSS."""
    import equinox as eqx
    import jax

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from dantinox_eqx.config import Config
    from dantinox_eqx.data.sampling import sample_batch
    from dantinox_eqx.hostmem import keep_freed_memory
    from dantinox_eqx.model import Transformer
    from dantinox_eqx.train.optim import make_optimizer
    from dantinox_eqx.train.step import init_opt_state, make_train_step
    from run import BABY

    keep_freed_memory()
    kw = dict(BIG if shape == "big" else BABY)
    if loss_chunk:
        kw["loss_chunk"] = loss_chunk
    cfg = Config(**kw)
    params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    opt = make_optimizer(cfg, 100)
    state = init_opt_state(opt, params)
    step = make_train_step(static, opt)
    tokens = jax.random.randint(jax.random.key(7), (200_000,), 0, cfg.vocab_size)
    sampler = jax.jit(lambda k: sample_batch(tokens, k, cfg.batch_size, cfg.max_context, 1))
    times = []
    for i in range(steps + 2):  # two warm-up steps (compile)
        key = jax.random.key(i)
        batch = jax.block_until_ready(sampler(key))
        t = time.perf_counter()
        params, state, metrics = step(params, state, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return {"ms_per_step": round(1e3 * statistics.median(times[2:]), 2), "loss": float(metrics["loss"])}


def run_child(shape: str, loss_chunk: int, steps: int, src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{src / 'src'}:{src}"}
    cmd = ["/usr/bin/time", "-v", sys.executable, str(Path(__file__).resolve()), "--one", "--shape", shape,
           "--loss_chunk", str(loss_chunk), "--steps", str(steps)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "peak_rss_MB": round(rss_kb / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", action="store_true")
    ap.add_argument("--shape", default="big", choices=["big", "baby"])
    ap.add_argument("--loss_chunk", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baby_steps", type=int, default=200)
    ap.add_argument("--before", type=Path, default=None, help="checkout to compare the baby shape against")
    ap.add_argument("--out", type=Path,
                    default=ROOT / "benchmarks" / "results" / f"ce_memory_cpu-{os.cpu_count()}core.json")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.shape, a.loss_chunk, a.steps)))
        return
    runs = {"big_plain": [], "big_chunked": [], "baby_before": [], "baby_after": []}
    for _ in range(a.rounds):  # interleaved: a slow spell of the shared machine hits both sides
        runs["big_plain"].append(run_child("big", -1, a.steps, ROOT))
        runs["big_chunked"].append(run_child("big", 0, a.steps, ROOT))
        if a.before is not None:
            runs["baby_before"].append(run_child("baby", 0, a.baby_steps, a.before))
            runs["baby_after"].append(run_child("baby", 0, a.baby_steps, ROOT))
    summary = {k: {"peak_rss_MB": min(r["peak_rss_MB"] for r in v), "ms_per_step": min(r["ms_per_step"] for r in v),
                   "runs": v} for k, v in runs.items() if v}
    out = {"what": "training step peak RSS (/usr/bin/time -v) and median ms/step; min over interleaved rounds",
           "big": BIG, "tokens": BIG["batch_size"] * BIG["max_context"],
           "logits_MB": round(BIG["batch_size"] * BIG["max_context"] * BIG["vocab_size"] * 4 / 2**20, 1),
           "before_checkout": str(a.before) if a.before else None, **summary}
    from dantinox_eqx.files import atomic_write_text

    atomic_write_text(a.out, json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "runs"} if isinstance(v, dict) and "runs" in v
                      else v for k, v in out.items()}, indent=1))


if __name__ == "__main__":
    main()
