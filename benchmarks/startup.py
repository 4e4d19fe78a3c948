"""Seconds to the first step (issue 16): `dantinox-eqx --help` and a 1-step tiny run, cold and warm.

    python benchmarks/startup.py [--repeats 3]

Measured, each as the wall time of a fresh process (best of `--repeats`, interleaved so that a
slow spell of a shared machine hits every kind alike; every reading is kept in the JSON):

- `import jax`: `python -c "import jax"`, the floor every command pays;
- `--help`: `dantinox-eqx --help` (aim: within 1 s of `import jax`);
- cold: `dantinox-eqx train` for 1 step of a 2-block, dim-64 model on a small synthetic corpus
  (written here; nothing outside the repository is read) with an EMPTY compilation cache
  (aim <= 10 s): the first run after installing;
- warm: the same command again with that cache filled by the cold run (aim <= 5 s);
- no cache: the same with `--no-compile-cache` (every program compiled, as before issue 16).

Each 1-step run also evaluates once (the run's last step) and writes its run directory. The
load average during the measurement is recorded: on a shared machine every time is inflated.
Results: benchmarks/results/startup_<machine>.json and the table in benchmarks/README.md
(between the startup markers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TINY_RUN = ["--dim", "64", "--n_heads", "2", "--head_size", "32", "--num_blocks", "2", "--max_steps", "1"]


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "dantinox-eqx"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cli.main"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "DANTINOX_EQX_COMPILE_CACHE")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), *sys.path]), WANDB_MODE="offline",
               JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"), **extra)
    return env


def _wall(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return round(wall, 2)


def _corpus(folder: Path) -> Path:
    """~100 kB of seeded pseudo-words (the char tokenizer sees 27 symbols)."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    path = folder / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(20_000)) + "\n", encoding="utf-8")
    return path


def measure(repeats: int) -> dict:
    cli = _cli()
    readings: dict[str, list[float]] = {k: [] for k in ("import_jax", "help", "cold", "warm", "no_cache")}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = _corpus(tmp)
        # The token cache and the default corpus are not what is measured: prepare both first.
        _wall([*cli, "--no-compile-cache", "train", "--data_path", str(corpus), "--run_dir", str(tmp / "prep"),
               *TINY_RUN], _env(DANTINOX_EQX_CACHE=str(tmp / "cache")))
        for r in range(repeats):
            loads.append(os.getloadavg()[0])
            readings["import_jax"].append(_wall([sys.executable, "-c", "import jax"], _env()))
            readings["help"].append(_wall([*cli, "--help"], _env()))
            jax_cache = tmp / f"jax-cache-{r}"  # empty: a cold start
            env = _env(DANTINOX_EQX_CACHE=str(tmp / "cache"), DANTINOX_EQX_COMPILE_CACHE=str(jax_cache))
            run = ["train", "--data_path", str(corpus), *TINY_RUN]
            readings["cold"].append(_wall([*cli, *run, "--run_dir", str(tmp / f"cold{r}")], env))
            readings["warm"].append(_wall([*cli, *run, "--run_dir", str(tmp / f"warm{r}")], env))
            readings["no_cache"].append(_wall([*cli, "--no-compile-cache", *run, "--run_dir", str(tmp / f"none{r}")],
                                              env))
            cached = sum(1 for _ in jax_cache.iterdir()) if jax_cache.is_dir() else 0
            shutil.rmtree(jax_cache, ignore_errors=True)
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in readings.items())
                  + f" ({cached} programs cached; load {loads[-1]:.1f})", flush=True)
    best = {k: min(v) for k, v in readings.items()}
    return {"best_s": best, "median_s": {k: statistics.median(v) for k, v in readings.items()},
            "readings_s": readings, "help_minus_import_jax_s": round(best["help"] - best["import_jax"], 2),
            "load_average_1min": [round(x, 1) for x in loads], "cpus": os.cpu_count(),
            "command": " ".join(["dantinox-eqx", "train", "--data_path", "corpus.txt", *TINY_RUN]),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def write_table(res: dict) -> None:
    b, m = res["best_s"], res["median_s"]
    rows = [("`python -c \"import jax\"`", "import_jax", "-"), ("`dantinox-eqx --help`", "help", "<= import jax + 1 s"),
            ("1-step tiny run, cold (empty compilation cache)", "cold", "<= 10 s"),
            ("1-step tiny run, warm (cache filled by the cold run)", "warm", "<= 5 s"),
            ("1-step tiny run, `--no-compile-cache`", "no_cache", "-")]
    lines = ["| what | best s | median s | aim |", "|---|---|---|---|"]
    lines += [f"| {label} | {b[k]:.2f} | {m[k]:.2f} | {aim} |" for label, k, aim in rows]
    table = "\n".join(lines) + (f"\n\n{len(res['readings_s']['help'])} interleaved rounds, {res['date']}, "
                                f"{res['cpus']} CPUs, 1-min load average {res['load_average_1min']}.\n")
    from bench_readme import write_section

    write_section("startup", table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    res = measure(args.repeats)
    print(json.dumps(res["best_s"]), f"help - import jax = {res['help_minus_import_jax_s']} s")
    from dantinox_eqx.config import atomic_write_text

    name = f"startup_cpu-{os.cpu_count()}core.json"
    atomic_write_text(RESULTS / name, json.dumps(res, indent=1) + "\n")
    write_table(res)
    print(f"wrote {RESULTS / name} and benchmarks/README.md")


if __name__ == "__main__":
    main()
