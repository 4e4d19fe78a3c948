"""Peak host memory of training on a prepared dataset, by corpus size (issue 14).

    python benchmarks/loader_memory.py [--tokens 200000000 20000000] [--steps 50] [--work /tmp/dx_loader_mem]

For each size it writes a prepared dataset of random uint16 ids (shards of 2**27 tokens, as
`dantinox-eqx prepare` cuts them; written in 16M-token chunks, so building it needs little
memory), then runs `dantinox-eqx train` on it under `/usr/bin/time -v` (a tiny model: dim 64,
2 blocks, context 64, batch 12; 50 steps, evaluating every 25 on 5 batches of each split, with
`max_train_tokens` raised so that the whole training split is sampled) and records the peak
resident set size ("Maximum resident set size") and the wall time. Results go to
benchmarks/results/loader_memory_<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run import RESULTS, machine_name  # noqa: E402
from tests.prepared import write_index  # noqa: E402

from dantinox_eqx.config import atomic_write_text  # noqa: E402
from dantinox_eqx.data.tokenizer import char_tokenizer  # noqa: E402

SHARD_TOKENS, CHUNK, VOCAB = 1 << 27, 1 << 24, 255
TRAIN_ARGS = ["--dim", "64", "--n_heads", "4", "--head_size", "16", "--num_blocks", "2", "--max_context", "64",
              "--batch_size", "12", "--eval_interval", "25", "--eval_iters", "5", "--warmup_steps", "10",
              "--max_train_tokens", str(10**12)]


def build(out: Path, n_tokens: int, seed: int = 0) -> Path:
    """A prepared dataset of `n_tokens` random ids below VOCAB (reused when already there)."""
    if (out / "index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng, shards, left = np.random.default_rng(seed), [], n_tokens
    while left:
        name, size = f"shard_{len(shards):05d}.bin", min(SHARD_TOKENS, left)
        with open(out / name, "wb") as f:
            for a in range(0, size, CHUNK):
                rng.integers(0, VOCAB, min(CHUNK, size - a), dtype=np.uint16).tofile(f)
        shards.append({"file": name, "tokens": size, "documents": 1, "bytes": size})
        left -= size
    tok = char_tokenizer("".join(chr(0x100 + i) for i in range(VOCAB)))
    tok.add_special_tokens(["<|endoftext|>"])
    return write_index(out, shards, tok, source=f"random uint16 ids, seed {seed}")


def peak_rss(data: Path, steps: int) -> dict:
    """Train `steps` steps on `data` under /usr/bin/time -v: peak RSS (MB) and wall time (s)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "cli.main", "train", "--data_path", str(data),
               "--run_dir", f"{tmp}/run", "--max_steps", str(steps), *TRAIN_ARGS]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
        wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    last = [line for line in proc.stdout.splitlines() if line.startswith("step ")][-1]
    return {"peak_rss_MB": round(kb / 1024, 1), "wall_s": round(wall, 1), "last_row": last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[200_000_000, 20_000_000])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--work", default="/tmp/dx_loader_mem", help="where the datasets are written (kept)")
    args = ap.parse_args()
    out = {"machine": machine_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps,
           "train_args": TRAIN_ARGS, "runs": []}
    for n in args.tokens:
        data = build(Path(args.work) / f"ids_{n}", n)
        r = {"tokens": n, "dataset_MB": round(2 * n / 2**20, 1), **peak_rss(data, args.steps)}
        out["runs"].append(r)
        print(f"{n:>12,d} tokens ({r['dataset_MB']} MB of shards): peak RSS {r['peak_rss_MB']} MB, "
              f"{r['wall_s']} s; {r['last_row']}", flush=True)
    atomic_write_text(RESULTS / f"loader_memory_{machine_name()}.json", json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
