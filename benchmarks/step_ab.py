"""Interleaved A/B of SmolLM2-135M training-step variants in one process (float32, batch 2 x 256).

    PYTHONPATH=src python benchmarks/step_ab.py [MODEL.gguf] --variants unroll1,unroll30 [--rounds 4]

Variants (comma-separated): `unrollN` = the model with scan_unroll N; `unstacked` = one array
per layer (what the trainer runs for deep models, train/layer_layout.py). Each round times one LoRA
(r8, every projection) and one full AdamW step of every variant in turn, so a slow spell of this
shared machine hits all of them; prints and returns per-variant medians and each round's times,
with the 1-minute load average before and after, and the process's user and system CPU time per
step (robust to other processes' load: it counts only this process's work, page faults
included). XLA flags are process-wide: compare them by
running this script once per XLA_FLAGS setting, alternately (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dantinox_eqx.hostmem import keep_freed_memory  # noqa: E402
from dantinox_eqx.run.gguf import from_gguf  # noqa: E402
from step_profile import GGUF, _step_entry, with_unroll  # noqa: E402


def variant(model, name: str):
    if name.startswith("unroll"):
        return with_unroll(model, int(name[len("unroll"):]))
    if name == "unstacked":  # the layers as separate arrays (train/layer_layout.py)
        return model
    raise SystemExit(f"--variants: unknown variant {name!r}; use unrollN or unstacked")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path, nargs="?", default=GGUF)
    ap.add_argument("--variants", default="unroll1,unroll30")
    ap.add_argument("--kinds", default="lora,full")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--old_malloc", action="store_true",
                    help="hostmem before issue 25: thresholds 1 GiB, per-thread arenas (for an A/B across processes)")
    a = ap.parse_args()
    if a.old_malloc:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
        mallopt(-3, 1 << 30), mallopt(-1, 1 << 30)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    else:
        keep_freed_memory()
    loaded = from_gguf(a.model, max_context=512)
    batch = jax.random.randint(jax.random.key(0), (1, 2, 257), 0, loaded.config.vocab_size)
    entries = {}
    for v in a.variants.split(","):
        m = variant(loaded.model, v)
        for kind in a.kinds.split(","):
            t = time.perf_counter()
            run = _step_entry(m, kind == "lora", batch, hlo=False, unstack=v == "unstacked")[0]
            for _ in range(3):  # compile, then let the malloc heap reach its steady size
                jax.block_until_ready(run())
            print(f"{v} {kind}: compiled + first step {time.perf_counter() - t:.1f} s", flush=True)
            entries[f"{kind}_{v}"] = run
    load0 = os.getloadavg()[0]
    times, user, system = ({n: [] for n in entries} for _ in range(3))
    for _ in range(a.rounds):
        for n, f in entries.items():
            t, c = time.perf_counter(), os.times()
            jax.block_until_ready(f())
            c2 = os.times()
            times[n].append(round(1e3 * (time.perf_counter() - t), 1))
            user[n].append(round(1e3 * (c2.user - c.user)))
            system[n].append(round(1e3 * (c2.system - c.system)))
    med = lambda d: {n: round(statistics.median(v), 1) for n, v in d.items()}
    res = {"old_malloc": a.old_malloc, "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
           "median_ms": med(times),
           "median_cpu_user_ms": med(user), "median_cpu_system_ms": med(system), "rounds_ms": times}
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
