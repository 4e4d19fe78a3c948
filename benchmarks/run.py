"""dantinox-eqx benchmarks: `nox -s benchmarks [-- --quick]` (or `python benchmarks/run.py`).

For each config of a matrix it measures, after warm-up, the median ms/step, tokens/s, model
FLOPs utilisation, the step's compile time and peak memory; plus sampling tokens/s, the data
pipeline's share of a step, compile time against depth, and (full mode) the original DantinoX
0.4.14 on the same baby shape and corpus through its own CLI.

MFU = model FLOPs per step / step time / peak. Model FLOPs per token are 6 N (N = non-embedding
parameters a token passes through: active experts only for MoE, the tied/untied head included)
plus the attention term 12 L T D (PaLM, appendix B; causal masking not discounted). The peak is
measured in the same run on CPU (best of a large jitted float32 matmul) and is the vendor's dense
number on GPUs (H100 SXM: 989 TFLOP/s bf16, 67 TFLOP/s fp32 without tensor cores).

Results go to benchmarks/results/<machine>.json; benchmarks/README.md's table is rebuilt from
every results file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from bench_readme import write_section
from dantinox_eqx.config import Config, atomic_write_text
from dantinox_eqx.data.corpus import default_corpus_path
from dantinox_eqx.data.sampling import sample_batch
from dantinox_eqx.hostmem import keep_freed_memory
from dantinox_eqx.model import Transformer, cast_floating
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# nanoGPT's shakespeare_char "baby" shape, which every CPU comparison in the brief uses.
BABY = dict(dim=128, n_heads=4, head_size=32, num_blocks=4, max_context=64, batch_size=12,
            vocab_size=65, use_swiglu=False, expansion=4, dropout_rate=0.0, lr=1e-3,
            warmup_steps=100, max_steps=2000, beta2=0.99)
GPT2_SMALL = dict(dim=768, n_heads=12, head_size=64, num_blocks=12, max_context=1024, batch_size=16,
                  vocab_size=50304, use_swiglu=False, expansion=4, dropout_rate=0.0, lr=6e-4,
                  warmup_steps=100, max_steps=1000)

# name -> (overrides, where it runs: "all" | "gpu" | "full" (CPU full mode and GPUs))
MATRIX: dict[str, tuple[dict, str]] = {
    "baby": (BABY, "all"),
    "baby-bf16": ({**BABY, "use_bf16": True}, "all"),
    "default-config": ({}, "full"),  # configs/default_config.yaml as shipped
    "baby-moe-4x2": ({**BABY, "use_moe": True, "n_experts": 4, "top_k_mlp": 2, "expansion": 2}, "all"),
    "baby-mla": ({**BABY, "mla": True, "down_dim_q": 64, "down_dim_kv": 64, "rope_dim": 16}, "all"),
    "baby-lora-r8": ({**BABY, "use_lora": True, "lora_rank": 8}, "all"),
    "baby-accum4": ({**BABY, "batch_size": 3, "grad_accum": 4}, "full"),
    "gpt2-small-bf16": ({**GPT2_SMALL, "use_bf16": True}, "gpu"),
    "gpt2-small-f32": (GPT2_SMALL, "gpu"),
}

GPU_PEAKS = {  # dense TFLOP/s from the vendors' datasheets: (bf16, fp32)
    "H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12),
}


def machine_name() -> str:
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        kind = dev.device_kind.replace("NVIDIA ", "").split()[0].lower()
        return f"gpu-{kind}-x{jax.device_count()}"
    return f"cpu-{os.cpu_count()}core"


def measure_cpu_peak(n: int = 2048, reps: int = 5) -> float:
    """Best float32 matmul FLOP/s of XLA on this CPU (one large jitted GEMM)."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = min(_time(lambda: f(a)) for _ in range(reps))
    return 2 * n**3 / best


def _time(fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def flops_per_token(cfg: Config, params) -> float:
    """6 N + 12 L T D (see the module docstring); N excludes embedding tables, includes the head."""
    n = sum(x.size for x in jax.tree.leaves(params))
    n -= params.embedding.size + (0 if params.pos_embedding is None else params.pos_embedding.size)
    if cfg.weight_tying:
        n += params.embedding.size  # the tied head is still a matmul every token pays for
    if cfg.use_moe:  # only top_k of n_experts expert MLPs run per token
        try:
            from dantinox_eqx.nn.moe import param_counts

            total, active = param_counts(cfg)
            n -= total - active
        except (ImportError, TypeError):
            pass
    return 6 * n + 12 * cfg.num_blocks * cfg.max_context * cfg.dim


def _build(cfg: Config):
    model = Transformer(cfg, key=jax.random.key(0))
    trainable = None
    if cfg.use_lora:
        from dantinox_eqx.lora import apply_lora, lora_trainable

        model = apply_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                           key=jax.random.key(1))
        trainable = lora_trainable(model)
    if cfg.use_bf16:
        model = cast_floating(model, jnp.bfloat16)
    params, static = eqx.partition(model, eqx.is_array)
    opt = make_optimizer(cfg, cfg.max_steps or 1000, mu_dtype=jnp.bfloat16 if cfg.use_bf16 else None)
    state = init_opt_state(opt, params, trainable)
    step = make_train_step(static, opt, alpha_balance=cfg.alpha_balance if cfg.use_moe else 0.0,
                           trainable=trainable)
    return model, params, state, step


ROUNDS = 3  # timing rounds per config, interleaved across configs; the fastest round's median counts


def prepare_config(name: str, cfg: Config) -> dict:
    """Build, compile (timed) and warm up one matrix entry; `time_round` then times it."""
    model, params, state, step = _build(cfg)
    tokens = jax.random.randint(jax.random.key(7), (200_000,), 0, cfg.vocab_size)
    sampler = jax.jit(lambda k: sample_batch(tokens, k, cfg.batch_size, cfg.max_context, cfg.grad_accum))
    batch = sampler(jax.random.key(0))
    t0 = time.perf_counter()
    compiled = step.lower(params, state, batch, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_peak = None if mem is None else (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                         + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    for i in range(3):  # warm-up
        params, state, metrics = step(params, state, sampler(jax.random.key(i)), jax.random.key(i))
    jax.block_until_ready(metrics)
    return {"name": name, "cfg": cfg, "model": model, "params": params, "state": state, "step": step,
            "sampler": sampler, "compile_s": compile_s, "xla_peak": xla_peak, "rounds": [], "metrics": metrics}


def time_round(b: dict, steps: int) -> None:
    """Time `steps` steps of a prepared entry, one sync per step (the honest per-step wall time)."""
    params, state, step, sampler = b["params"], b["state"], b["step"], b["sampler"]
    times = []
    for i in range(steps):
        key = jax.random.key(len(b["rounds"]) * steps + i)
        t = time.perf_counter()
        params, state, metrics = step(params, state, sampler(key), key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    b.update(params=params, state=state, metrics=metrics)
    b["rounds"].append(times)


def finish_config(b: dict, peak: float) -> dict:
    """The entry's record: ms/step = the fastest round's median (noise on a shared machine only
    adds time, and the rounds of all entries are interleaved so a slow spell hits one round)."""
    cfg, sampler = b["cfg"], b["sampler"]
    medians = [statistics.median(r) for r in b["rounds"]]
    best = b["rounds"][int(np.argmin(medians))]
    keys = [jax.random.key(i) for i in range(20)]
    data_s = statistics.median(_time(lambda k=k: sampler(k)) for k in keys)
    ms = 1e3 * min(medians)
    tok = cfg.batch_size * cfg.grad_accum * cfg.max_context
    fpt = flops_per_token(cfg, eqx.filter(b["model"], eqx.is_array))
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform == "gpu" else None
    return {
        "name": b["name"], "ms_per_step": round(ms, 2), "ms_per_step_p10": round(1e3 * np.percentile(best, 10), 2),
        "ms_per_step_rounds": [round(1e3 * m, 2) for m in medians],
        "tokens_per_s": round(tok / ms * 1e3), "mfu": round(fpt * tok / (ms / 1e3) / peak, 4),
        "compile_s": round(b["compile_s"], 2), "flops_per_token": fpt,
        "peak_mem_MB": round((stats or {}).get("peak_bytes_in_use", b["xla_peak"] or 0) / 2**20, 1),
        "data_pipeline_pct": round(100 * data_s / (ms / 1e3), 2),
        "final_loss": float(b["metrics"]["loss"]), "params": int(sum(x.size for x in jax.tree.leaves(b["params"]))),
        "dtype": "bfloat16" if cfg.use_bf16 else "float32",
    }


def bench_sampling(cfg: Config, new_tokens: int = 256) -> dict:
    """Cached decoding tokens/s: prefill 16 tokens, then one jitted scan of `new_tokens` steps."""
    model = Transformer(cfg, key=jax.random.key(0))
    if cfg.use_bf16:
        model = cast_floating(model, jnp.bfloat16)

    @eqx.filter_jit
    def generate(model, prompt):
        cache = model.init_cache(prompt.shape[0])
        T = prompt.shape[1]
        logits, cache = model.decode(prompt, jnp.broadcast_to(jnp.arange(T), prompt.shape), cache)

        def one(carry, i):
            tok, cache = carry
            logits, cache = model.decode(tok[:, None], jnp.full((prompt.shape[0], 1), T + i), cache)
            nxt = jnp.argmax(logits[:, -1], -1)
            return (nxt, cache), nxt

        (_, _), out = jax.lax.scan(one, (jnp.argmax(logits[:, -1], -1), cache), jnp.arange(new_tokens))
        return out

    prompt = jnp.zeros((1, 16), jnp.int32)
    jax.block_until_ready(generate(model, prompt))
    best = min(_time(lambda: generate(model, prompt)) for _ in range(3))
    return {"sampling_tokens_per_s": round(new_tokens / best)}


def bench_compile_depth(depths=(2, 8, 16), scan_unroll: int = 0) -> dict:
    """Compile time of the train step by depth; scan_unroll 0 = the default (auto)."""
    out = {}
    for L in depths:
        cfg = Config(**{**BABY, "num_blocks": L, "scan_unroll": scan_unroll})
        _, params, state, step = _build(cfg)
        batch = jnp.zeros((1, cfg.batch_size, cfg.max_context + 1), jnp.int32)
        t = time.perf_counter()
        step.lower(params, state, batch, jax.random.key(0)).compile()
        out[str(L)] = round(time.perf_counter() - t, 2)
    return out


CLI_STEPS = (60, 560)  # two run lengths: start-up, compilation and final evaluation cancel out
CLI_REPEATS = 3  # each length is run this often and its fastest wall time kept


def _cli_per_step(command, steps: tuple[int, int] = CLI_STEPS, repeats: int = CLI_REPEATS) -> dict:
    """Per-step wall time of a training CLI from runs that differ only in their number of steps:
    (min wall(long) - min wall(short)) / (long - short); the minimum over repeats because noise
    on a shared machine (start-up, other tenants) only ever adds time. `command(tmp, n)` -> argv
    that trains n steps in the empty folder tmp."""
    walls: dict[int, list[float]] = {n: [] for n in steps}
    for _ in range(repeats):
        for n in steps:  # interleaved, so a slow spell hits both lengths alike
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                proc = subprocess.run(command(tmp, n), capture_output=True, timeout=1800, text=True)
                if proc.returncode != 0:
                    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
                walls[n].append(round(time.perf_counter() - t, 2))
    short, long = steps
    per_step = 1e3 * (min(walls[long]) - min(walls[short])) / (long - short)
    return {"ms_per_step": round(per_step, 2), "wall_s": {str(n): w for n, w in walls.items()}, "steps": list(steps)}


def bench_dantinox(exe: str) -> dict:
    """DantinoX 0.4.14's own CLI on the baby shape and corpus (see `_cli_per_step`)."""
    cfg = "\n".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in {
        "dim": 128, "n_heads": 4, "head_size": 32, "num_blocks": 4, "max_context": 64, "batch_size": 12,
        "lr": 0.001, "dropout_rate": 0.0, "epochs": 1, "use_swiglu": False, "warmup_steps": 10,
        "eval_iters": 5}.items())
    with tempfile.TemporaryDirectory() as cfg_dir:
        (Path(cfg_dir) / "baby.yaml").write_text(cfg + "\n")
        # Its steps per epoch = train tokens / (batch * context): max_train_tokens sets the steps.
        return _cli_per_step(lambda tmp, n: [exe, "train", "--config", f"{cfg_dir}/baby.yaml", "--data_path",
                                             str(default_corpus_path()), "--run_dir", f"{tmp}/run{n}",
                                             "--max_train_tokens", str(n * 12 * 64)])


def bench_ours_cli() -> dict:
    """Our CLI measured exactly like bench_dantinox (same shape, same corpus, same method)."""
    exe = shutil.which("dantinox-eqx") or str(Path(sys.executable).parent / "dantinox-eqx")
    return _cli_per_step(lambda tmp, n: [exe, "train", "--config", str(ROOT / "configs" / "default_config.yaml"),
                                         "--data_path", str(default_corpus_path()), "--run_dir", f"{tmp}/run{n}",
                                         "--max_steps", str(n), "--eval_interval", "1000", "--eval_iters", "5"])


def bench_nanogpt(python: str) -> dict:
    """nanoGPT's baby-shape step in PyTorch, eager and compiled (benchmarks/nanogpt_ref.py),
    run by `python` (a virtual environment with torch)."""
    proc = subprocess.run([python, str(ROOT / "benchmarks" / "nanogpt_ref.py")], capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_table() -> None:
    """Rebuild the Markdown table in benchmarks/README.md from every results file."""
    rows = []
    for f in sorted(RESULTS.glob("*.json")):
        res = json.loads(f.read_text())
        if "configs" not in res:
            continue
        for r in res["configs"]:
            machine = res["machine"] + (" (quick)" if res.get("quick") else "")
            cells = [machine, r["name"], r["dtype"], r["ms_per_step"], r["tokens_per_s"],
                     f"{100 * r['mfu']:.1f}", r["compile_s"], r["peak_mem_MB"], r.get("sampling_tokens_per_s", "")]
            rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    table = ("| machine | config | dtype | ms/step | tokens/s | MFU % | compile s | peak MB | sample tok/s |\n"
             "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    write_section("table", table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small matrix that finishes in < 3 min on CPU")
    ap.add_argument("--only", nargs="*", help="run only these matrix entries")
    ap.add_argument("--dantinox", help="path to DantinoX 0.4.14's `dantinox` executable (side by side)")
    ap.add_argument("--nanogpt", help="a Python with torch: time nanoGPT's step on the baby shape beside ours")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per config")
    args = ap.parse_args()
    keep_freed_memory()  # what the CLI and the Trainer do (dantinox_eqx/hostmem.py)
    on_gpu = jax.devices()[0].platform == "gpu"
    steps = args.steps or (20 if args.quick else 60)  # per round; ROUNDS rounds
    dev = jax.devices()[0]
    if on_gpu:
        kind = next((k for k in GPU_PEAKS if k in dev.device_kind), None)
        peaks = GPU_PEAKS.get(kind, (None, None))
    else:
        cpu_peak = measure_cpu_peak()
        peaks = (cpu_peak, cpu_peak)
    print(f"{machine_name()}: {dev.device_kind}, jax {jax.__version__}, peak {peaks[1] / 1e9:.0f} GFLOP/s fp32")
    out = {"machine": machine_name(), "device": dev.device_kind, "jax": jax.__version__,
           "python": platform.python_version(), "quick": args.quick, "peak_flops_fp32": peaks[1],
           "peak_flops_bf16": peaks[0], "date": time.strftime("%Y-%m-%d %H:%M"),
           "host": socket.gethostname(), "configs": []}
    default = Config.from_yaml(ROOT / "configs" / "default_config.yaml")
    prepared = []
    for name, (overrides, where) in MATRIX.items():
        if args.only and name not in args.only:
            continue
        if where == "gpu" and not on_gpu or where == "full" and args.quick and not on_gpu:
            continue
        cfg = default.replace(vocab_size=65) if not overrides else Config(**overrides)
        try:
            prepared.append(prepare_config(name, cfg))
        except ImportError as e:  # a feature of a later issue not built yet
            print(f"  {name}: skipped ({e})")
    for _ in range(ROUNDS):
        for b in prepared:
            time_round(b, steps)
    for b in prepared:
        cfg = b["cfg"]
        r = finish_config(b, peaks[0] if cfg.use_bf16 else peaks[1])
        if not args.quick or b["name"] == "baby":
            r.update(bench_sampling(cfg))
        out["configs"].append(r)
        print(f"  {r['name']:16s} {r['ms_per_step']:8.2f} ms/step {r['tokens_per_s']:9d} tok/s "
              f"MFU {100 * r['mfu']:5.1f}% compile {r['compile_s']:5.2f}s mem {r['peak_mem_MB']} MB "
              f"data {r['data_pipeline_pct']}% (rounds {r['ms_per_step_rounds']})")
    prepared.clear()
    out["compile_s_by_depth"] = bench_compile_depth()
    out["compile_s_by_depth_rolled"] = bench_compile_depth(scan_unroll=1)
    print(f"  compile time by depth, default scan_unroll (auto): {out['compile_s_by_depth']}; "
          f"rolled scan (scan_unroll 1): {out['compile_s_by_depth_rolled']}")
    if not args.quick and not on_gpu:
        out["cli_ours"] = bench_ours_cli()
        print(f"  our CLI, baby shape: {out['cli_ours']}")
        if args.dantinox:
            out["cli_dantinox"] = bench_dantinox(args.dantinox)
            ours = (out.get("cli_ours") or {}).get("ms_per_step")
            if ours:
                out["ratio_vs_dantinox"] = round(ours / out["cli_dantinox"]["ms_per_step"], 3)
            print(f"  DantinoX 0.4.14 CLI, baby shape: {out['cli_dantinox']} ratio {out.get('ratio_vs_dantinox')}")
    if args.nanogpt and not args.quick and not on_gpu:
        out["nanogpt"] = bench_nanogpt(args.nanogpt)
        baby = next((r for r in out["configs"] if r["name"] == "baby"), None)
        for mode in ("eager", "compiled"):
            theirs = out["nanogpt"].get(mode, {}).get("ms_per_step")
            if baby and theirs:
                out[f"ratio_vs_nanogpt_{mode}"] = round(baby["ms_per_step"] / theirs, 3)
        print(f"  nanoGPT (PyTorch) step, baby shape: {out['nanogpt']}; ours / theirs: "
              f"{out.get('ratio_vs_nanogpt_eager')} eager, {out.get('ratio_vs_nanogpt_compiled')} compiled")
    out["max_rss_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    name = machine_name() + ("-quick" if args.quick else "")
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(out, indent=2) + "\n")
    write_table()
    print(f"wrote {RESULTS / (name + '.json')} and benchmarks/README.md")


if __name__ == "__main__":
    main()
