"""Multi-device scaling: ms/step and tokens/s of the sharded train step, dp and fsdp.

    PYTHONPATH=src python benchmarks/scaling.py [--devices 1,2,4,8] [--steps 10] [--platform cpu]

Each (device count, mode) runs in its own subprocess (the CPU device count is fixed when JAX
starts): on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=N, on GPU over the first N
real devices (`--platform gpu`; a count above the visible GPUs gives an error row). A baby model
(4 blocks, dim 128, context 64, vocab 256, float32) takes a global batch of 48 sequences split
over the "data" axis, so the work per step is the same at every device count.

Simulated CPU devices all share the host's cores: the numbers record the *shape* of the
scaling (the overhead of partitioning, collectives and per-device dispatch), not a speed-up.
Compilation is excluded (2 warm-up steps); ms/step is the median over --steps timed steps.
Writes benchmarks/results/scaling_<hostname>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(num_blocks=4, dim=128, n_heads=4, head_size=32, max_context=64, vocab_size=256,
             batch_size=48, expansion=4, lr=1e-3, warmup_steps=2)


def child(n: int, mode: str, steps: int) -> dict:
    """Time the sharded step on `n` devices (run inside the subprocess)."""
    import equinox as eqx
    import jax

    from dantinox_eqx.config import Config
    from dantinox_eqx.data.sampling import sample_batch
    from dantinox_eqx.model import Transformer
    from dantinox_eqx.parallel import sharding as sh
    from dantinox_eqx.train.optim import make_optimizer
    from dantinox_eqx.train.step import init_opt_state, make_train_step

    cfg = Config(**SHAPE)
    params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    opt = make_optimizer(cfg, 1000)
    mesh = sh.make_mesh(n, batch_size=cfg.batch_size)
    params, state = sh.place(params, init_opt_state(opt, params), mesh, mode)
    step = sh.shard_train_step(make_train_step(static, opt), mesh, params, state)
    tokens = jax.random.randint(jax.random.key(1), (100_000,), 0, cfg.vocab_size)
    batches = [sh.shard_batch(sample_batch(tokens, jax.random.key(s), cfg.batch_size, cfg.max_context), mesh, 1)
               for s in range(steps + 2)]
    t0 = time.perf_counter()
    for s in range(2):
        params, state, m = step(params, state, batches[s], jax.random.key(s))
    jax.block_until_ready(m)
    warmup_s = time.perf_counter() - t0
    times = []
    for s in range(2, steps + 2):
        t = time.perf_counter()
        params, state, m = step(params, state, batches[s], jax.random.key(s))
        jax.block_until_ready((params, m))
        times.append(time.perf_counter() - t)
    ms = 1000 * statistics.median(times)
    return {"devices": n, "mode": mode, "ms_per_step": ms,
            "tokens_per_s": cfg.batch_size * cfg.max_context / (ms / 1000),
            "ms_min": 1000 * min(times), "ms_max": 1000 * max(times), "warmup_s": warmup_s,
            "param_bytes_per_device": sh.bytes_per_device(params)["max"],
            "state_bytes_per_device": sh.bytes_per_device(state)["max"],
            "loss": float(m["loss"]), "platform": jax.devices()[0].platform}


def run_one(n: int, mode: str, steps: int, plat: str, timeout: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    if plat == "cpu":
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    cmd = [sys.executable, __file__, "--child", f"{n},{mode}", "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        return {"devices": n, "mode": mode, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--modes", default="dp,fsdp")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--platform", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per subprocess")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        n, mode = args.child.split(",")
        print(json.dumps(child(int(n), mode, args.steps)))
        return
    load_before = os.getloadavg()
    rows = [run_one(int(n), mode, args.steps, args.platform, args.timeout)
            for n in args.devices.split(",") for mode in args.modes.split(",")]
    result = {
        "host": socket.gethostname(), "platform": args.platform, "cpus": os.cpu_count(),
        "python": platform.python_version(), "shape": SHAPE, "steps": args.steps,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        # other work on the host distorts timings: flag it when the load exceeds the cores
        "contended": max(load_before[0], os.getloadavg()[0]) > (os.cpu_count() or 1),
        "note": ("simulated CPU devices share the host's cores: this records the shape of the scaling "
                 "(partitioning and collective overhead), not a speed-up") if args.platform == "cpu" else "",
        "rows": rows,
    }
    out = ROOT / "benchmarks" / "results" / f"scaling_{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(f"{'devices':>7} {'mode':>5} {'ms/step':>9} {'tokens/s':>9} {'params/dev':>11} {'state/dev':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['devices']:>7} {r['mode']:>5}  failed: {r['error']}")
            continue
        print(f"{r['devices']:>7} {r['mode']:>5} {r['ms_per_step']:>9.1f} {r['tokens_per_s']:>9.0f} "
              f"{r['param_bytes_per_device'] / 2**20:>9.2f}Mi {r['state_bytes_per_device'] / 2**20:>8.2f}Mi")
    print(f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
