"""Peak RSS of `dantinox-eqx train --data_path SOURCE` on a raw text file, measured with
`/usr/bin/time -v` (the figure docs/guides/data.md quotes for training on a source directly).

    python benchmarks/train_source_memory.py --source_dir DIR [--sizes_mb 10] [--tokenizers char bpe]

Builds a text file of each size by repeating the *.txt texts found in --source_dir (any UTF-8
text: the tests' corpus package, a book), then trains a tiny model for 50 steps on it through
this checkout's CLI with a fresh cache (so the encoding of the file is part of the measurement),
and records peak RSS, wall and CPU time in --out (benchmarks/results/train_source_memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from data_prepare import _seconds, _texts, _time_v  # the same /usr/bin/time -v parsing

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "64", "--n_heads", "4", "--head_size", "16", "--num_blocks", "2", "--max_context", "32",
        "--batch_size", "8", "--max_steps", "50", "--eval_interval", "50", "--eval_iters", "2"]


def build(texts: list[str], size_mb: float, dest: Path) -> Path:
    """A text file of about `size_mb` MB: the texts repeated in order."""
    want, written = int(size_mb * 1e6), 0
    with open(dest, "w", encoding="utf-8") as f:
        while written < want:
            for t in texts:
                f.write(t)
                written += len(t.encode())
                if written >= want:
                    break
    return dest


def measure(src: Path, work: Path, tokenizer: str) -> dict:
    cache, run = work / "cache", work / "run"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "cli.main", "train", "--data_path", str(src),
           "--run_dir", str(run), "--tokenizer_type", tokenizer, "--bpe_vocab_size", "2048", *TINY]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "JAX_PLATFORMS": "cpu",
           "DANTINOX_EQX_CACHE": str(cache), "WANDB_MODE": "offline"}
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    cpu = float(_time_v(proc.stderr, "User time (seconds)")) + float(_time_v(proc.stderr, "System time (seconds)"))
    return {"text_mb": round(src.stat().st_size / 1e6, 1), "tokenizer": tokenizer,
            "peak_rss_mb": round(int(_time_v(proc.stderr, "Maximum resident set size (kbytes)")) / 1024, 1),
            "wall_s": round(_seconds(_time_v(proc.stderr, "Elapsed (wall clock) time (h:mm:ss or m:ss)")), 1),
            "cpu_s": round(cpu, 1), "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source_dir", type=Path, required=True, help="folder of *.txt texts to repeat")
    ap.add_argument("--sizes_mb", type=float, nargs="+", default=[10])
    ap.add_argument("--tokenizers", nargs="+", default=["char", "bpe"], choices=["char", "bpe"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_source_memory.json")
    args = ap.parse_args()
    texts = _texts(args.source_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dantinox-eqx-train-source-") as tmp:
        work = Path(tmp)
        for size in args.sizes_mb:
            src = build(texts, size, work / f"corpus_{size:g}mb.txt")
            for tok in args.tokenizers:
                rows.append(measure(src, work, tok))
                print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"machine": os.uname().nodename, "rows": rows}, indent=1) + "\n")
    print("| text | tokenizer | peak RSS | wall | CPU |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['text_mb']} MB | {r['tokenizer']} | {r['peak_rss_mb']:.0f} MB | {r['wall_s']} s "
              f"| {r['cpu_s']} s |")


if __name__ == "__main__":
    main()
