"""Where one decoded token's time goes: SmolLM2-135M greedy decoding on CPU, batch 1.

    PYTHONPATH=src python benchmarks/decode_profile.py MODEL [--tokens 16] [--rounds 3]

MODEL: a Hugging Face folder (read by `run.hf.from_hf`) or a GGUF file (dequantised to float32
by transformers, as benchmarks/smollm2.py does). For each variant:
- "stacked_float32": the model as loaded (blocks stacked, layers run by `lax.scan`), the decode
  path before issue 25's changes;
- "float32", "int8", "bfloat16": `store_weights(model, w)` (infer/storage.py: unstacked blocks,
  int8 / bfloat16 weights, nn/quant.py); all with a
  max_context (512) slot cache, and "+sized" with `cache_size` slots (prompt + tokens, bucketed);
it records
- ms per token of the decode loop alone (`decode_steps` over `--tokens` tokens after a prefill,
  median of interleaved rounds, compilation excluded), and of one `decode_steps` call per token
  (the host sync per token that the one-call loop avoids);
- a `jax.profiler` trace of the loop: time per token of each XLA op, summed into categories by
  the op's output shape and name in the compiled program: weight matmuls, weight-slice copies
  (the stacked scan's dynamic slices), head (the (1, V) logits), attention over the cache, cache
  update, cache copies, norms / RoPE / other elementwise, sampling; "untraced" is the wall time
  per token minus the ops' sum (loop, thunk dispatch, host);
- the compiled while-loop body: copies of cache-sized or weight-sized buffers, and whether the
  jitted call aliases (donates) its cache;
- bytes read per token (weights + KV cache slots) over the time per token, against a measured
  read bandwidth (a jitted sum over 512 MB).
Writes benchmarks/results/decode_profile.json (`--out`). The machine is shared: `uptime` load
averages are recorded with the timings.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dantinox_eqx.files import atomic_write_text
from dantinox_eqx.infer.generate import Sampling, cache_size, decode_steps, left_pad, prefill
from dantinox_eqx.infer.storage import store_weights
from dantinox_eqx.run.hf import from_hf

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The three most important things to remember when learning to cook are"


def load(path: Path, max_context: int):
    if path.suffix != ".gguf":
        model, _, tok = from_hf(path, max_context=max_context)
        return model, tok
    from smollm2 import load_both  # benchmarks/smollm2.py: transformers dequantises the GGUF

    _, _, model, tok = load_both(path, max_context)
    return model, tok


def uptime() -> str:
    return os.popen("uptime").read().strip().split("load average:")[-1].strip()


def read_bandwidth() -> float:
    """GB/s of a jitted float32 sum over 512 MB (best of 3): the bound a weight-streaming loop meets."""
    big = jnp.ones((128 * 2**20,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(big).block_until_ready()
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        total(big).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return big.nbytes / best / 1e9


def weight_bytes(model) -> int:
    """Bytes of every array read whole per token: all parameters but the embedding table (one
    row per token), plus the head (the embedding itself when tied and not stored separately)."""
    arrays = [a for a in jax.tree.leaves(eqx.filter(model, eqx.is_array))]
    n = sum(a.nbytes for a in arrays) - model.embedding.nbytes
    return n + (model.embedding.nbytes if model.head is None else 0)


def cache_bytes(state) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(state.cache))


class Variant:
    """A stored model after its prefill; `sized`: a cache of `cache_size` slots, not max_context."""

    def __init__(self, model, prompt_ids: list[int], n: int, sized: bool = False):
        tokens, positions = left_pad([prompt_ids], 16)
        self.model, self.n = model, n
        size = cache_size(model, len(prompt_ids), n) if sized else None
        self.state = prefill(model, jnp.asarray(tokens), jnp.asarray(positions), size)
        self.sampling = Sampling.make(0.0, None, None, model.vocab_size)
        self.key = jax.random.key(0)

    def loop(self, n: int | None = None) -> list[int]:
        n = self.n if n is None else n
        _, out, _ = decode_steps(self.model, self.state, jnp.int32(n), self.key, self.sampling, self.n)
        return np.asarray(out)[0, :n].tolist()

    def per_token_calls(self) -> list[int]:
        state, ids = self.state, []
        for _ in range(self.n):
            state, out, _ = decode_steps(self.model, state, jnp.int32(1), self.key, self.sampling, 1)
            ids.append(int(np.asarray(out)[0, 0]))
        return ids

    def compiled_text(self) -> str:
        lowered = decode_steps.lower(self.model, self.state, jnp.int32(self.n), self.key, self.sampling, self.n)
        return lowered.compile().compiled.as_text()


def hlo_shape(dtype, shape) -> str:
    """How the compiled program's text writes an array type: f32[576,960]."""
    short = {"float32": "f32", "bfloat16": "bf16", "int8": "s8", "int32": "s32"}[jnp.dtype(dtype).name]
    return f"{short}[{','.join(map(str, shape))}]"


_LINE = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) (\S+?)\(")


def hlo_ops(text: str) -> dict[str, tuple[str, str, str]]:
    """instruction name -> (shape, opcode, metadata op_name) for every instruction in `text`."""
    ops = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            op_name = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = (m.group(2), m.group(3), op_name.group(1) if op_name else "")
    return ops


def category(name: str, op: tuple[str, str, str] | None, vocab: int, slots: int, weight_shapes: set[str]) -> str:
    shape, opcode, op_name = op if op else ("", "", "")
    dims = [int(d) for d in re.findall(r"\d+", shape.split("{")[0])]
    if "dynamic-update-slice" in name or "scatter" in op_name or "dynamic_update" in op_name:
        return "cache update"
    if "dynamic-slice" in name and any(w in shape for w in weight_shapes):
        return "weight-slice copies (stacked scan)"
    if vocab in dims:
        if "iota" in name or "argmax" in op_name or "reduce_max" in op_name or "select" in op_name:
            return "sampling"
        return "head (logits)"
    if slots in dims:
        if name.startswith("copy") or "copy" in name or "dynamic-slice" in name:
            return "cache copies"
        return "attention over the cache"
    if opcode == "dot" or name.startswith("dot") or "dot_general" in op_name or (
            "reduce_sum" in op_name and dims and max(dims) >= 64):
        return "weight matmuls"
    if any(k in op_name for k in ("rsqrt", "sin", "cos", "mul", "add", "neg", "concatenate", "integer_pow")):
        return "norms, RoPE, elementwise"
    return "other"


def profile(variant: Variant, tag: str, vocab: int, slots: int, weight_shapes: set[str]) -> dict:
    ops = hlo_ops(variant.compiled_text())
    variant.loop()
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        variant.loop()
        jax.profiler.stop_trace()
        f = sorted(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True))[-1]
        events = json.load(gzip.open(f))
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_cat, per_op = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["name"] not in ops:
            continue
        if ops[e["name"]][1] == "while":  # the loops themselves contain the ops
            continue
        per_op[e["name"]] += e["dur"] / 1e3 / variant.n
        per_cat[category(e["name"], ops[e["name"]], vocab, slots, weight_shapes)] += e["dur"] / 1e3 / variant.n
    return {"ms_per_token_traced_ops": {k: round(v, 2) for k, v in per_cat.most_common()},
            "top_ops_ms_per_token": {k: round(v, 2) for k, v in per_op.most_common(12)}}


def body_copies(text: str, cache_shapes: set[str], weight_shapes: set[str]) -> dict:
    """Copies (and slice fusions) of cache- or weight-sized buffers anywhere in the program,
    and whether the entry aliases any input to an output (donation)."""
    copies = collections.Counter()
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        base = shape.split("{")[0]
        if opcode == "copy" or "dynamic-slice" in name:
            if base in cache_shapes:
                copies[f"cache-sized {opcode} {base}"] += 1
            elif base in weight_shapes:
                copies[f"weight-sized {opcode} {base}"] += 1
    return {"copies": dict(copies), "input_output_alias": "input_output_alias" in text}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="stacked_float32,float32,int8,bfloat16,float32+sized,int8+sized",
                    help="+sized: a cache of cache_size(prompt, tokens) slots instead of max_context")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_profile.json")
    a = ap.parse_args()
    model, tok = load(a.model, 512)
    prompt_ids = tok.encode(PROMPT).ids
    names = a.variants.split(",")
    variants = {v: Variant(model if v == "stacked_float32" else store_weights(model, v.split("+")[0]), prompt_ids,
                           a.tokens, sized=v.endswith("+sized")) for v in names}
    res = {"what": "one decoded token of SmolLM2-135M, CPU, batch 1, max_context 512 cache",
           "model": a.model.name, "tokens": a.tokens, "rounds": a.rounds, "jax": jax.__version__,
           "machine": f"{os.cpu_count()} cores", "load_before": uptime(),
           "read_bandwidth_GBps": round(read_bandwidth(), 2)}
    outs, loop_t, calls_t = {}, collections.defaultdict(list), collections.defaultdict(list)
    for v in variants.values():  # compile
        v.loop(), v.per_token_calls()
    for _ in range(a.rounds):  # interleaved
        for k, v in variants.items():
            t = time.perf_counter()
            outs[k] = v.loop()
            loop_t[k].append((time.perf_counter() - t) / a.tokens)
            t = time.perf_counter()
            assert v.per_token_calls() == outs[k]
            calls_t[k].append((time.perf_counter() - t) / a.tokens)
    res["load_after_timing"] = uptime()
    stacked = model.blocks
    weight_shapes = {hlo_shape(x.dtype, x.shape[1:]) for x in jax.tree.leaves(eqx.filter(stacked, eqx.is_array))}
    for k, v in variants.items():
        ms = 1e3 * statistics.median(loop_t[k])
        cache = jax.tree.leaves(v.state.cache)
        cache_shapes = {hlo_shape(a.dtype, s) for a in cache for s in (a.shape, a.shape[1:], (1,) + a.shape[1:])}
        text = v.compiled_text()
        wb, cb = weight_bytes(v.model), cache_bytes(v.state)
        res[k] = {
            "ms_per_token_loop": round(ms, 2), "tokens_per_s_loop": round(1e3 / ms, 2),
            "ms_per_token_one_call_per_token": round(1e3 * statistics.median(calls_t[k]), 2),
            "ms_rounds": [round(1e3 * t, 1) for t in loop_t[k]],
            "greedy_equals_stacked_float32": outs[k] == outs[names[0]],
            "bytes_per_token": {"weights_MB": round(wb / 1e6, 1), "kv_cache_MB": round(cb / 1e6, 1)},
            "GBps_achieved": round((wb + cb) / (ms / 1e3) / 1e9, 2),
            "compiled": body_copies(text, cache_shapes, weight_shapes),
        }
        res[k] |= profile(v, k, model.vocab_size, model.max_context, weight_shapes)
        traced = sum(res[k]["ms_per_token_traced_ops"].values())
        res[k]["untraced_ms_per_token"] = round(ms - traced, 2)
    res["bound_note"] = ("GBps_achieved / read_bandwidth_GBps: how close a variant's token is to reading its "
                         "bytes at the measured bandwidth (traced op times run slower than untraced ones)")
    atomic_write_text(a.out, json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
