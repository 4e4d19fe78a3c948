"""The head + cross-entropy's backward by hand vs autodiff's, alone and in SmolLM2's training step.

    PYTHONPATH=src python benchmarks/head_loss_ab.py [MODEL.gguf] [--rounds 9]

1. Alone, at SmolLM2-135M's shapes (512 tokens x 576 features, a 49152-token head; random
   values, no model needed): forward + backward of the summed loss, the head trained ("full")
   and frozen ("lora"), through `plain_cross_entropy` left to autodiff (the reference) and
   through `chunked_cross_entropy` with the logits whole (`_whole`: its backward by hand and its
   log-sum-exp in tiles), and chunked (`--chunk` rows).
2. With MODEL (the GGUF or Hugging Face folder `smollm2.py` reads): our jitted LoRA r8 and full
   AdamW steps with the loss through each path (the reference by swapping `_whole` for the
   autodiff computation while the step is traced), and transformers + peft's steps, interleaved;
   also the median over rounds of each round's ratio (the steps of one round run back to back,
   which this VM's drift between rounds spoils less).

Writes benchmarks/results/head_loss_ab.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dantinox_eqx.files import atomic_write_text
from dantinox_eqx.hostmem import keep_freed_memory
from dantinox_eqx.nn import cross_entropy as ce

ROOT = Path(__file__).resolve().parents[1]
N, D, V = 512, 576, 49152


def _reference_whole(hidden, head, targets, w, softcap):
    """`_whole`'s value through the reference computation: autodiff differentiates it."""
    return ce.plain_cross_entropy(hidden, head, targets, w, softcap)[0]


def alone_entries(chunk: int) -> dict:
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((N, D)).astype(np.float32))
    head = jnp.asarray(0.05 * rng.standard_normal((D, V)).astype(np.float32))
    t = jnp.asarray(rng.integers(0, V, (N,)).astype(np.int32))
    paths = {"autodiff": lambda h, w: ce.plain_cross_entropy(h, w, t, None)[0],
             "by_hand": lambda h, w: ce.chunked_cross_entropy(h, w, t, None, None)[0],
             f"chunked{chunk}": lambda h, w: ce.chunked_cross_entropy(h, w, t, None, chunk)[0]}
    entries, grads = {}, {}
    for name, f in paths.items():
        for kind, argnums in (("full", (0, 1)), ("lora", 0)):
            g = jax.jit(jax.grad(f, argnums))
            grads[f"{kind}_{name}"] = jax.block_until_ready(g(h, head))
            entries[f"alone_{kind}_{name}"] = lambda g=g: jax.block_until_ready(g(h, head))
    ref = grads["full_autodiff"]
    diff = {k: [float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(v, ref)]
            for k, v in grads.items() if k.startswith("full_") and k != "full_autodiff"}
    return entries, diff


def step_entries(model_path: Path) -> dict:
    from smollm2 import load_both, ours_step, torch_step

    tf, _, ours, _ = load_both(model_path, max_context=512)
    batch = np.random.default_rng(0).integers(0, ours.vocab_size, (2, 257)).astype(np.int32)
    entries, by_hand = {}, ce._whole
    for kind in ("lora", "full"):
        for name, whole in (("autodiff", _reference_whole), ("by_hand", by_hand)):
            ce._whole = whole
            try:
                run = ours_step(ours, kind == "lora", batch)
                run()  # traced and compiled now, with this `_whole`
            finally:
                ce._whole = by_hand
            entries[f"step_{kind}_{name}"] = run
        entries[f"step_{kind}_torch"] = torch_step(tf, kind == "lora", batch)
    return entries


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path, nargs="?")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "head_loss_ab.json")
    a = ap.parse_args()
    keep_freed_memory()
    entries, diff = alone_entries(a.chunk)
    if a.model is not None:
        import torch

        torch.set_num_threads(os.cpu_count())
        entries |= step_entries(a.model)
    for fn in entries.values():
        fn()
    times = {k: [] for k in entries}
    for _ in range(a.rounds):
        for name, fn in entries.items():
            t = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t))
    res = {"what": "head + cross-entropy fwd + bwd at SmolLM2's shapes (512 x 576, vocab 49152), and SmolLM2 "
                   "steps (batch 2 x 256), float32; medians of interleaved rounds, ms",
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "jax": jax.__version__, "rounds": a.rounds, "load_average": os.getloadavg(),
           "gradient_max_rel_diff_vs_autodiff": diff,
           "ms": {k: round(statistics.median(v), 1) for k, v in times.items()},
           "all_ms": {k: [round(t) for t in v] for k, v in times.items()}}
    if a.model is not None:
        from smollm2 import median_round_ratio

        for kind in ("lora", "full"):
            pair = lambda x, y: median_round_ratio(times[f"step_{kind}_{x}"], times[f"step_{kind}_{y}"])  # noqa: E731
            res[f"step_{kind}_by_hand_over_autodiff_median_of_rounds"] = pair("by_hand", "autodiff")
            res[f"step_{kind}_by_hand_over_torch_median_of_rounds"] = pair("by_hand", "torch")
    atomic_write_text(a.out, json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "all_ms"}, indent=1))


if __name__ == "__main__":
    main()
