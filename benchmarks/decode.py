"""Decoding speed: the KV-cached loop vs naive re-forwarding, and per-token cost by position.

    PYTHONPATH=src python benchmarks/decode.py [--config configs/default_config.yaml]
        [--new_tokens 256] [--vocab_size 65] [--batch 1] [--max_context C] [--out FILE]

Random weights on the config's model shape (only speed is measured). Both paths decode
greedily from the same 16-token prompt:
- cached: `generate_ids`: one prefill call, then every token inside one jitted while_loop
  over a fixed-size ring-buffer cache;
- naive: `naive_generate`: every token re-runs the full forward over a (1, max_context) window
  (one compilation, so this measures the recompute, not re-tracing).
Per-token cost by position: the cached loop is run in 16-token chunks and the first and last
chunks are timed separately (likewise single naive tokens at the start and the end).
Compilation is excluded (each path runs once before timing); times are the median of
`--repeats` runs. Prints a table and writes benchmarks/results/decode_<hostname>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dantinox_eqx.config import Config
from dantinox_eqx.infer.generate import (
    Sampling,
    _last_logits,
    bucket,
    decode_steps,
    generate_ids,
    left_pad,
    naive_generate,
    prefill,
)
from dantinox_eqx.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 16


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cached_chunk_times(model: Transformer, prompt: list[int], new_tokens: int, batch: int) -> list[float]:
    """Seconds per CHUNK-token decode call, in order (prefill excluded)."""
    sampling = Sampling.make(0.0, None, None, model.vocab_size)
    tokens, positions = left_pad([prompt] * batch, bucket(len(prompt), model.max_context))
    state = prefill(model, jnp.asarray(tokens), jnp.asarray(positions))
    key, out = jax.random.key(0), []
    for _ in range(new_tokens // CHUNK):
        t = time.perf_counter()
        state, ids, _ = decode_steps(model, state, jnp.int32(CHUNK), key, sampling, CHUNK)
        ids.block_until_ready()
        out.append(time.perf_counter() - t)
    return out


def naive_token_times(model: Transformer, prompt: list[int], positions: list[int]) -> list[float]:
    """Seconds of one naive step (full forward over the window) with `n` tokens of context."""
    out = []
    C = model.max_context
    for n in positions:
        window = np.zeros((1, C), np.int32)
        window[0, :min(n, C)] = (prompt * (C // len(prompt) + 1))[:min(n, C)]
        t = time.perf_counter()
        jnp.argmax(_last_logits(model, jnp.asarray(window), jnp.int32(min(n, C) - 1))).block_until_ready()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default_config.yaml"))
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--vocab_size", type=int, default=65)  # tiny Shakespeare's characters
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max_context", type=int, default=None, help="Override the config's context (cache) size.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_<host>.json)")
    args = ap.parse_args(argv)

    config = Config.from_yaml(args.config).replace(vocab_size=args.vocab_size)
    if args.max_context:
        config = config.replace(max_context=args.max_context)
    model = Transformer(config, key=jax.random.key(0))
    prompt = np.asarray(jax.random.randint(jax.random.key(1), (16,), 0, args.vocab_size)).tolist()
    n = args.new_tokens

    cached = lambda: generate_ids(model, [prompt] * args.batch, n, temperature=0.0)
    naive = lambda: naive_generate(model, prompt, n)
    cached_ids = cached()[0]  # compile
    naive_ids = naive()
    # the two paths agree while the sequence fits the context (past it, naive restarts positions)
    agree = int(np.argmin(np.r_[cached_ids[0] == np.asarray(naive_ids), False]))
    t_cached = _median_time(cached, args.repeats)
    t_naive = _median_time(naive, max(1, args.repeats // 2))

    chunks = cached_chunk_times(model, prompt, n, args.batch)  # warm-up + compile of the chunk shape
    chunks = [statistics.median(c) for c in zip(*(cached_chunk_times(model, prompt, n, args.batch)
                                                  for _ in range(args.repeats)))]
    k = max(1, len(chunks) // 4)
    early_c, late_c = statistics.median(chunks[:k]) / CHUNK, statistics.median(chunks[-k:]) / CHUNK
    early_pos = list(range(len(prompt), len(prompt) + 16))
    late_pos = list(range(len(prompt) + n - 16, len(prompt) + n))
    naive_token_times(model, prompt, early_pos[:1])  # compiled already; warm the path
    early_n = statistics.median(naive_token_times(model, prompt, early_pos * args.repeats))
    late_n = statistics.median(naive_token_times(model, prompt, late_pos * args.repeats))

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "host": socket.gethostname(), "device": str(jax.devices()[0]), "backend": jax.default_backend(),
        "python": platform.python_version(), "jax": jax.__version__,
        "load_average": load, "cpu_count": os.cpu_count(),
        "model": {k: getattr(config, k) for k in ("dim", "n_heads", "head_size", "num_blocks", "max_context",
                                                  "vocab_size", "expansion", "use_swiglu")},
        "batch": args.batch, "prompt_tokens": len(prompt), "new_tokens": n, "repeats": args.repeats,
        "cached": {"seconds": t_cached, "tokens_per_s": args.batch * n / t_cached,
                   "ms_per_token_early": 1e3 * early_c, "ms_per_token_late": 1e3 * late_c},
        "naive": {"seconds": t_naive, "tokens_per_s": n / t_naive,
                  "ms_per_token_early": 1e3 * early_n, "ms_per_token_late": 1e3 * late_n},
        "speedup": t_naive / t_cached * args.batch,
        "greedy_tokens_equal_before_diverging": agree,
    }
    print(f"decode benchmark on {result['device']} (load average {load}; timings on a shared machine "
          "are indicative only)")
    print(f"model {result['model']}, batch {args.batch}, prompt {len(prompt)}, new tokens {n}")
    print(f"{'path':<8}{'tokens/s':>12}{'ms/token early':>18}{'ms/token late':>17}")
    for name in ("cached", "naive"):
        r = result[name]
        print(f"{name:<8}{r['tokens_per_s']:>12.1f}{r['ms_per_token_early']:>18.3f}{r['ms_per_token_late']:>17.3f}")
    print(f"cached is {result['speedup']:.1f}x faster; greedy tokens agree for the first {agree} "
          f"(of {n}; the context is {config.max_context})")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"decode_{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
