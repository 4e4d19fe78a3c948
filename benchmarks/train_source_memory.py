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
import tempfile
from pathlib import Path

from data_prepare import _texts, timed_cli  # the same run under /usr/bin/time -v

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
    _, t = timed_cli(["train", "--data_path", str(src), "--run_dir", str(run), "--tokenizer_type", tokenizer,
                      "--bpe_vocab_size", "2048", *TINY], DANTINOX_EQX_CACHE=str(cache), WANDB_MODE="offline")
    return {"text_mb": round(src.stat().st_size / 1e6, 1), "tokenizer": tokenizer,
            "peak_rss_mb": round(t["peak_rss_mb"], 1), "wall_s": round(t["wall_s"], 1),
            "cpu_s": round(t["cpu_s"], 1), "load_avg": t["load_avg"]}


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
