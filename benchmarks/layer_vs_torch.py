"""One SmolLM2-135M decoder layer, ours vs transformers', forward and forward + backward, interleaved.

    PYTHONPATH=src python benchmarks/layer_vs_torch.py MODEL [--rounds 7]

MODEL: the GGUF file (or a Hugging Face folder) `benchmarks/smollm2.py` reads; both sides hold
the same float32 weights (`smollm2.load_both`). Layer 0 of each on the same (2, 256, 576)
activations at positions 0..255, causal: ours a jitted `Block` call (and `jax.vjp` of it, the
gradient of its weights and input), theirs `LlamaDecoderLayer` with SDPA attention (and
`backward`, weights' gradients included). Also the compiled forward's op count and, from a
`jax.profiler` trace, the CPU time of its ops (summed over threads) against its wall time: what
the runtime spends between ops. Writes benchmarks/results/layer_vs_torch_cpu.json (`--out`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch

from dantinox_eqx.files import atomic_write_text
from dantinox_eqx.hostmem import keep_freed_memory
from dantinox_eqx.model import unstack_blocks
from smollm2 import load_both  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]
B, T = 2, 256


def op_cpu_ms(fn, calls: int = 5) -> float:
    """Mean CPU time per call of the XLA ops of `fn` (thunks on XLA's threads, nested events and
    the executor's own waits left out)."""
    from jax._src.lib import _profile_data

    where = tempfile.mkdtemp()
    jax.profiler.start_trace(where)
    for _ in range(calls):
        fn()
    jax.profiler.stop_trace()
    data = _profile_data.ProfileData.from_file(sorted(glob.glob(f"{where}/**/*.xplane.pb", recursive=True))[-1])
    total = 0
    for plane in data.planes:
        for line in plane.lines:
            if "XLA" not in line.name:
                continue
            for ev in line.events:
                if not ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "end: ", "Thread")):
                    total += ev.duration_ns
    return total / calls / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10, help="calls per entry per round")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "layer_vs_torch_cpu.json")
    a = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(os.cpu_count())
    tf, _, ours, _ = load_both(a.model, max_context=512)
    rng = np.random.default_rng(0)
    x, g = (rng.standard_normal((B, T, ours.embedding.shape[1])).astype(np.float32) for _ in range(2))

    params, static = eqx.partition(unstack_blocks(ours).blocks[0], eqx.is_array)
    positions = jnp.arange(T)

    def block(p, h):
        return eqx.combine(p, static)(h, positions)[0]

    fwd = jax.jit(block)
    fwd_bwd = jax.jit(lambda p, h, dy: jax.vjp(block, p, h)[1](dy))
    jx, jg = jnp.asarray(x), jnp.asarray(g)

    layer = tf.model.layers[0]
    tx, tg = torch.from_numpy(x), torch.from_numpy(g)
    tpos = torch.arange(T)[None].expand(B, -1)
    rope = tf.model.rotary_emb(tx, tpos)

    def theirs(h):
        out = layer(h, attention_mask=None, position_ids=tpos, position_embeddings=rope)
        return out[0] if isinstance(out, tuple) else out

    def theirs_fwd():
        with torch.no_grad():
            return theirs(tx)

    def theirs_fwd_bwd():
        h = tx.clone().requires_grad_()
        theirs(h).backward(tg)
        for p in layer.parameters():
            p.grad = None

    diff = float(np.abs(np.asarray(fwd(params, jx)) - theirs_fwd().numpy()).max())
    entries = {"ours_forward": lambda: fwd(params, jx).block_until_ready(), "theirs_forward": theirs_fwd,
               "ours_forward_backward": lambda: jax.block_until_ready(fwd_bwd(params, jx, jg)),
               "theirs_forward_backward": theirs_fwd_bwd}
    for fn in entries.values():
        fn(), fn()
    times = {k: [] for k in entries}
    for _ in range(a.rounds):
        for name, fn in entries.items():
            t = time.perf_counter()
            for _ in range(a.calls):
                fn()
            times[name].append(1e3 * (time.perf_counter() - t) / a.calls)
    med = {k: statistics.median(v) for k, v in times.items()}
    hlo = fwd.lower(params, jx).compile().as_text()
    res = {"what": "SmolLM2-135M layer 0, float32, (2, 256) tokens; median ms per call over interleaved rounds",
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "jax": jax.__version__, "torch": torch.__version__, "load_average": os.getloadavg(),
           "max_abs_diff_of_outputs": diff,
           **{k: {"ms": round(v, 2), "all_ms": [round(t, 2) for t in times[k]]} for k, v in med.items()},
           "forward_ratio_ours_over_theirs": round(med["ours_forward"] / med["theirs_forward"], 3),
           "forward_backward_ratio_ours_over_theirs": round(med["ours_forward_backward"]
                                                            / med["theirs_forward_backward"], 3),
           "ours_forward_ops": len(re.findall(r"^\s*(?:ROOT )?%\S+ = \S+ (?:fusion|custom-call|dot)\(", hlo, re.M)),
           "ours_forward_op_cpu_ms": round(op_cpu_ms(entries["ours_forward"]), 2)}
    atomic_write_text(a.out, json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: (v["ms"] if isinstance(v, dict) else v) for k, v in res.items()}, indent=1))


if __name__ == "__main__":
    main()
