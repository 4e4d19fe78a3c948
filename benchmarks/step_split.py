"""Where SmolLM2-135M's full fine-tuning step spends its time, ours against PyTorch's, in one
process, interleaved (float32, batch 2 x 256, CPU).

    PYTHONPATH=src python benchmarks/step_split.py [MODEL.gguf] [--rounds 5]

Entries, each run `--steps_per_visit` times back to back per round (the visit's median is the
round's time), the order reversed every other round:
- ours_step: the trainer's full AdamW step (`make_train_step`, per-layer arrays, donated);
- ours_grads: the same loss's `value_and_grad` alone, no update: the step minus it is what the
  optimizer costs inside the step (AdamW's moments and weights, the gradient norm, and the copy
  of every weight that XLA makes there, below);
- ours_step_variant: the same step written out here (`ours_variant_step`), and
  ours_step_weights_read_after_norm: that step with AdamW reading the weights only after the
  gradient norm (`_read_after`). A weight that is also read by the backward pass (its input
  gradient, x @ W^T) has no data dependency ordering that read before its in-place update, so
  XLA's copy insertion copies every such weight at the step's start (181 copies, 420 MB for
  SmolLM2) and the backward reads the copy. Reading the weights through a value computed from
  all gradients orders them: no copy. It also keeps every update until the whole backward pass
  is done, where XLA otherwise runs each weight's update as soon as its gradient exists,
  alongside the remaining backward GEMMs on the other thread;
- torch_fwd / torch_bwd / torch_opt: transformers' model's forward + float32 loss, `backward`,
  and `torch.optim.AdamW.step` (+ zero_grad), each timed in the same step; torch_step is their
  sum. `torch.optim.AdamW` without options runs its per-tensor loop on CPU (foreach and fused
  are off by default there);
- torch_opt_fused: `AdamW(fused=True)` (one pass per tensor, hand-vectorised), the optimizer
  transformers' `Trainer` picks by default with torch >= 2.8 (`optim="adamw_torch_fused"`),
  stepped on a second copy of the model whose gradients are copied from the first's each
  round (the copy is not timed); torch_step_fused = torch_fwd + torch_bwd + torch_opt_fused.
Writes benchmarks/results/step_split_cpu.json (`--out`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dantinox_eqx.files import atomic_write_text  # noqa: E402
from dantinox_eqx.hostmem import keep_freed_memory, restart_with_huge_pages  # noqa: E402
from dantinox_eqx.train.grad_norm import global_norm  # noqa: E402
from dantinox_eqx.train.layer_layout import unstack_model  # noqa: E402
from dantinox_eqx.train.step import init_opt_state, loss_fn, make_train_step  # noqa: E402
from smollm2 import _torch_loss, load_both, median_round_ratio, ours_step  # noqa: E402
from step_profile import GGUF  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _read_after(params, grad_norm):
    """`params` unchanged, but read through a value computed from `grad_norm`: p - 0, where the
    0 is exact for every grad_norm (NaN and inf included), so every weight keeps its bits."""
    zero = jnp.where(jnp.isnan(grad_norm), 0.0, jnp.minimum(grad_norm, 0.0))
    return jax.tree.map(lambda p: p - zero.astype(p.dtype), params)


def _per_layer(model):
    """(params, static) of `model` with its layers as separate arrays, as the trainer runs it."""
    return eqx.partition(unstack_model(model, None)[0], eqx.is_array)


def ours_variant_step(model, batch: np.ndarray, read_after: bool):
    """The full AdamW step as `make_train_step` builds it for one plain micro-batch, with the
    update reading the weights after the gradient norm when `read_after`."""
    params, static = _per_layer(model)
    params = jax.tree.map(jnp.copy, params)
    opt = optax.adamw(1e-4)

    def step(params, opt_state, batch, key):
        (_, metrics), grads = jax.value_and_grad(
            lambda p: loss_fn(eqx.combine(p, static), batch, key), has_aux=True)(params)
        metrics["grad_norm"] = global_norm(grads)
        read = _read_after(params, metrics["grad_norm"]) if read_after else params
        updates, opt_state = opt.update(grads, opt_state, read)
        return eqx.apply_updates(read, updates), opt_state, metrics

    state = {"p": params, "s": opt.init(params)}
    batch = jnp.asarray(batch)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(state["p"], state["s"], batch, jax.random.key(0)).compile()

    def run():
        state["p"], state["s"], m = compiled(state["p"], state["s"], batch, jax.random.key(0))
        return float(m["loss"])

    run.compiled = compiled
    return run


def trainer_step_hlo(model, batch: np.ndarray):
    """The compiled program of the trainer's own full step (`make_train_step`), for its copies."""
    params, static = _per_layer(model)
    opt = optax.adamw(1e-4)
    step = make_train_step(static, opt)
    return step.lower(params, init_opt_state(opt, params), jnp.asarray(batch[None]), jax.random.key(0)).compile()


def ours_grads(model, batch: np.ndarray):
    params, static = _per_layer(model)
    grads = jax.jit(jax.value_and_grad(lambda p, b, k: loss_fn(eqx.combine(p, static), b, k), has_aux=True))
    batch = jnp.asarray(batch)

    def run():
        (loss, _), g = grads(params, batch, jax.random.key(0))
        jax.block_until_ready(g)
        return float(loss)

    return run


def torch_parts(tf, batch: np.ndarray):
    """A callable running one full step of `tf` (a copy), returning (fwd, bwd, opt, opt_fused)
    seconds; the fused optimizer steps a second copy with the same gradients."""
    model, twin = copy.deepcopy(tf), copy.deepcopy(tf)
    model.train()
    opt = torch.optim.AdamW(list(model.parameters()), lr=1e-4)
    opt_fused = torch.optim.AdamW(list(twin.parameters()), lr=1e-4, fused=True)
    ids = torch.from_numpy(batch.astype(np.int64))

    def run():
        t0 = time.perf_counter()
        loss = _torch_loss(model, ids)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters()):
                q.grad = p.grad.clone()
        t3 = time.perf_counter()
        opt_fused.step()
        opt_fused.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        return t1 - t0, t2 - t1, t5 - t4, t4 - t3

    return run


def param_copies(compiled) -> int:
    """Copies of entry parameters in a compiled step's HLO."""
    return len(re.findall(r" copy\(%params", compiled.as_text()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path, nargs="?", default=GGUF)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps_per_visit", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "step_split_cpu.json")
    a = ap.parse_args()
    restart_with_huge_pages([sys.executable, *sys.argv])  # as smollm2.py: both sides get huge pages
    keep_freed_memory()
    torch.set_num_threads(os.cpu_count())
    tf, _, ours, _ = load_both(a.model, max_context=512)
    batch = np.random.default_rng(0).integers(0, ours.vocab_size, (2, 257)).astype(np.int32)
    entries = {"ours_step": ours_step(ours, False, batch), "ours_grads": ours_grads(ours, batch),
               "ours_step_variant": ours_variant_step(ours, batch, read_after=False),
               "ours_step_weights_read_after_norm": ours_variant_step(ours, batch, read_after=True),
               "torch": torch_parts(tf, batch)}
    for fn in entries.values():
        fn(), fn()
    times = {k: [] for k in ("ours_step", "ours_grads", "ours_step_variant", "ours_step_weights_read_after_norm",
                             "torch_fwd", "torch_bwd", "torch_opt", "torch_opt_fused")}
    names = list(entries)
    for r in range(a.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            visit = []
            for _ in range(a.steps_per_visit):
                t = time.perf_counter()
                out = entries[name]()
                visit.append(out if name == "torch" else time.perf_counter() - t)
            if name == "torch":
                for i, part in enumerate(("torch_fwd", "torch_bwd", "torch_opt", "torch_opt_fused")):
                    times[part].append(statistics.median(v[i] for v in visit))
            else:
                times[name].append(statistics.median(visit))
    times["torch_step"] = [f + b + o for f, b, o in zip(times["torch_fwd"], times["torch_bwd"], times["torch_opt"])]
    times["torch_step_fused"] = [f + b + o for f, b, o in
                                 zip(times["torch_fwd"], times["torch_bwd"], times["torch_opt_fused"])]
    times["ours_optimizer_in_step"] = [s - g for s, g in zip(times["ours_step"], times["ours_grads"])]
    ms = {k: round(1e3 * statistics.median(v), 1) for k, v in times.items()}
    res = {"what": "SmolLM2-135M full fine-tuning step split, float32, batch 2 x 256, CPU; medians over "
                   "interleaved rounds (benchmarks/step_split.py docstring)",
           "model": a.model.name, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "jax": jax.__version__, "torch": torch.__version__, "rounds": a.rounds,
           "steps_per_visit": a.steps_per_visit, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
           "weight_copies_in_hlo": {"make_train_step": param_copies(trainer_step_hlo(ours, batch)),
                                    "weights_read_after_norm": param_copies(
                                        entries["ours_step_weights_read_after_norm"].compiled)},
           "median_ms": ms,
           "ratios_median_of_rounds": {
               "ours_step / torch_step": median_round_ratio(times["ours_step"], times["torch_step"]),
               "ours_step / torch_step_fused": median_round_ratio(times["ours_step"], times["torch_step_fused"]),
               "ours_grads / (torch_fwd + torch_bwd)": median_round_ratio(
                   times["ours_grads"], [f + b for f, b in zip(times["torch_fwd"], times["torch_bwd"])]),
               "ours_step_variant / ours_step": median_round_ratio(times["ours_step_variant"], times["ours_step"]),
               "weights_read_after_norm / ours_step_variant": median_round_ratio(
                   times["ours_step_weights_read_after_norm"], times["ours_step_variant"])},
           "rounds_ms": {k: [round(1e3 * t, 1) for t in v] for k, v in times.items()}}
    atomic_write_text(a.out, json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "rounds_ms"}, indent=1))


if __name__ == "__main__":
    main()
