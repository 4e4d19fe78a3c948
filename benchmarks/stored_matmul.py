"""The matmuls of one decoded token with stored weights, SmolLM2-135M's shapes, interleaved A/B.

    PYTHONPATH=src python benchmarks/stored_matmul.py [--rows 1] [--rounds 7]

30 layers of a Llama block's projections (q, o: 576 x 576; k, v: 576 x 192; gate, up: 576 x
1536; down: 1536 x 576; random weights), each layer's arrays separate (as `store_weights`
leaves them), `--rows` activation rows (1 = one sequence decoding), in one jitted call. Variants:
- float32: `x @ w`, the float32 weights (as `store_weights(model, "float32")` runs);
- int8: `nn.quant.int8_matmul` (two int8 rows per activation row, int8 x int8 -> int32 dot);
- int8_convert: `x @ q.astype(float32) * scale` (a dot on the converted weight);
- int8_one_row: one int8 row per activation row (per-row scale only): at one row the dot is a
  vector, which XLA:CPU keeps in its own (slow) codegen instead of YNNPACK's int8 kernels;
- bfloat16: `nn.quant.bfloat16_matmul` (hi + lo rows, bfloat16 x bfloat16 -> float32 dot).
Prints, per variant, the median ms per call over `--rounds` interleaved rounds and the largest
deviation from float32's result relative to its largest value; writes
benchmarks/results/stored_matmul_cpu.json (`--out`).
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
from dantinox_eqx.nn.quant import bfloat16_matmul, int8_matmul, quantize_int8

ROOT = Path(__file__).resolve().parents[1]
D, F, KV, LAYERS = 576, 1536, 192, 30
SHAPES = dict(q=(D, D), k=(D, KV), v=(D, KV), o=(D, D), gate=(D, F), up=(D, F), down=(F, D))


def int8_one_row(x, q, scale):
    s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    s = jnp.where(s > 0, s, 1.0)
    xq = jnp.clip(jnp.round(x / s), -127, 127).astype(jnp.int8)
    acc = jax.lax.dot_general(xq, q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * s * scale


MATMULS = {
    "float32": lambda x, w: x @ w,
    "int8": lambda x, w: int8_matmul(x, *w),
    "int8_convert": lambda x, w: (x @ w[0].astype(jnp.float32)) * w[1],
    "int8_one_row": lambda x, w: int8_one_row(x, *w),
    "bfloat16": bfloat16_matmul,
}


def layers_call(matmul):
    """One jitted pass of x through the 30 layers' projections (a block's data flow, no attention)."""
    @jax.jit
    def run(x, layers):
        for p in layers:
            q, k, v = matmul(x, p["q"]), matmul(x, p["k"]), matmul(x, p["v"])
            x = x + matmul(q, p["o"]) + 0.0 * (k.sum() + v.sum())
            x = x * jax.lax.rsqrt(1e-6 + jnp.mean(x * x, -1, keepdims=True))
            x = x + matmul(jax.nn.silu(matmul(x, p["gate"])) * matmul(x, p["up"]), p["down"])
        return x
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5, help="calls per variant per round")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stored_matmul_cpu.json")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    f32 = [{n: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.02) for n, s in SHAPES.items()}
           for _ in range(LAYERS)]
    stored = {"float32": f32,
              "bfloat16": jax.tree.map(lambda w: w.astype(jnp.bfloat16), f32)}
    stored["int8"] = stored["int8_convert"] = stored["int8_one_row"] = [
        {n: quantize_int8(w) for n, w in layer.items()} for layer in f32]
    x = jnp.asarray(rng.standard_normal((a.rows, D)).astype(np.float32))
    calls = {name: layers_call(mm) for name, mm in MATMULS.items()}
    ref = np.asarray(calls["float32"](x, f32))
    deviation = {name: float(np.abs(np.asarray(fn(x, stored[name])) - ref).max() / np.abs(ref).max())
                 for name, fn in calls.items()}
    times = {name: [] for name in calls}
    for _ in range(a.rounds):
        for name, fn in calls.items():
            t = time.perf_counter()
            for _ in range(a.calls):
                y = fn(x, stored[name])
            y.block_until_ready()
            times[name].append(1e3 * (time.perf_counter() - t) / a.calls)
    res = {"what": f"30 layers of SmolLM2-135M's projections, {a.rows} activation row(s), one jitted call; "
                   "median ms per call over interleaved rounds",
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "jax": jax.__version__,
           "load_average": os.getloadavg(), "rounds": a.rounds, "rows": a.rows}
    for name in calls:
        res[name] = {"ms": round(statistics.median(times[name]), 2), "all_ms": [round(t, 2) for t in times[name]],
                     "max_deviation_vs_float32": round(deviation[name], 5)}
        print(f"{name:13s} {res[name]['ms']:8.2f} ms   deviation from float32 {deviation[name]:.2e}")
    atomic_write_text(a.out, json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
