"""Peak memory and throughput of `dantinox-eqx prepare` (issue 14), measured with /usr/bin/time -v.

    python benchmarks/data_prepare.py --source_dir DIR [--sizes_mb 40 400] [--work_dir /tmp/...]

Builds corpora of each size by repeating the *.txt texts found in --source_dir, in three layouts:
`file` (one text file: one document), `folder` (one file per copy of each text) and `jsonl` (one
line per ~8 KB paragraph group, {"text": ...}); then prepares each with the char and the BPE
tokenizer (`--bpe_vocab_size`, default 2048) as a subprocess of this checkout's CLI under
`/usr/bin/time -v`, and records peak RSS, wall and CPU time, MB/s of the whole command and of
its encode phase, the load average around the run, and the prepared dataset's size. Nothing is
written inside the repository except the --out JSON; corpora and datasets live in --work_dir
(removed after each run unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("file", "folder", "jsonl")


def _texts(source_dir: Path) -> list[str]:
    files = sorted(source_dir.glob("*.txt"))
    if not files:
        sys.exit(f"--source_dir {source_dir}: no *.txt files to repeat")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def _paragraph_docs(text: str, size: int = 8192) -> Iterator[str]:
    """`text` in documents of about `size` characters, cut at blank lines."""
    doc: list[str] = []
    n = 0
    for para in text.split("\n\n"):
        doc.append(para)
        n += len(para) + 2
        if n >= size:
            yield "\n\n".join(doc) + "\n"
            doc, n = [], 0
    if doc:
        yield "\n\n".join(doc) + "\n"


def build(texts: list[str], layout: str, size_mb: float, dest: Path) -> Path:
    """A corpus of >= size_mb MB (1e6 bytes) of text in `layout` at `dest`, written as it goes."""
    target = int(size_mb * 1e6)
    written, copy = 0, 0
    if layout == "folder":
        dest.mkdir(parents=True)
        while written < target:
            for text in texts:
                data = text.encode("utf-8")
                (dest / f"part_{copy:05d}.txt").write_bytes(data)
                written += len(data)
                copy += 1
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", encoding="utf-8") as f:
        while written < target:
            for text in texts:
                if layout == "file":
                    f.write(text + "\n\n")
                    written += len(text.encode("utf-8")) + 2
                else:
                    for doc in _paragraph_docs(text):
                        f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                        written += len(doc.encode("utf-8"))
    return dest


def _time_v(stderr: str, label: str) -> str:
    m = re.search(rf"{re.escape(label)}: (.+)", stderr)
    return m.group(1).strip() if m else ""


def _seconds(clock: str) -> float:
    parts = [float(p) for p in clock.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def timed_cli(args: list[str], **env: str) -> tuple[str, dict]:
    """Run `dantinox-eqx ARGS` from this checkout under `/usr/bin/time -v`: (its stderr, and
    peak_rss_mb / wall_s / cpu_s unrounded, load_avg before and after). Raises on a non-zero exit."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "cli.main", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "JAX_PLATFORMS": "cpu", **env}
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    err = proc.stderr
    return err, {"peak_rss_mb": int(_time_v(err, "Maximum resident set size (kbytes)")) / 1024,
                 "wall_s": _seconds(_time_v(err, "Elapsed (wall clock) time (h:mm:ss or m:ss)")),
                 "cpu_s": float(_time_v(err, "User time (seconds)")) + float(_time_v(err, "System time (seconds)")),
                 "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def measure(src: Path, out: Path, tokenizer: str, bpe_vocab_size: int) -> dict:
    stderr, t = timed_cli(["prepare", str(src), str(out), "--tokenizer_type", tokenizer,
                           "--bpe_vocab_size", str(bpe_vocab_size)])
    index = json.loads((out / "index.json").read_text())
    wall, cpu = t["wall_s"], t["cpu_s"]
    mb = index["total_bytes"] / 1e6
    phase = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in
             re.finditer(r"^(scan|encode): [\d.]+(?:/[\d.]+)? MB, ([\d.]+) MB/s in ([\d.]+) s$", stderr, re.M)}
    return {"text_mb": round(mb, 1), "tokens": index["total_tokens"], "documents": index["total_documents"],
            "shards": len(index["shards"]), "vocab": index["vocab_size"],
            "peak_rss_mb": round(t["peak_rss_mb"], 1),
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "mb_per_s": round(mb / wall, 2),
            "mb_per_cpu_s": round(mb / cpu, 2),
            "encode_mb_per_s": phase.get("encode", (None,))[0], "encode_s": phase.get("encode", (None, None))[1],
            "scan_mb_per_s": phase.get("scan", (None,))[0],
            "load_avg": t["load_avg"],
            "dataset_mb": round(sum((out / s["file"]).stat().st_size for s in index["shards"]) / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source_dir", type=Path, required=True, help="folder of *.txt texts to repeat")
    ap.add_argument("--work_dir", type=Path, default=Path("/tmp/dantinox-eqx-prepare-bench"))
    ap.add_argument("--sizes_mb", type=float, nargs="+", default=[40, 400])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--tokenizers", nargs="+", default=["char", "bpe"], choices=["char", "bpe"])
    ap.add_argument("--bpe_vocab_size", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_prepare.json")
    ap.add_argument("--keep", action="store_true", help="keep the corpora and datasets in --work_dir")
    args = ap.parse_args()
    if ROOT in args.work_dir.resolve().parents or args.work_dir.resolve() == ROOT:
        sys.exit("--work_dir must be outside the repository")
    texts = _texts(args.source_dir)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for size in args.sizes_mb:
        for layout in args.layouts:
            src = args.work_dir / f"{layout}_{size:g}mb" / ("corpus.jsonl" if layout == "jsonl" else
                                                           "corpus" if layout == "folder" else "corpus.txt")
            shutil.rmtree(src.parent, ignore_errors=True)
            t0 = time.perf_counter()
            build(texts, layout, size, src)
            built = time.perf_counter() - t0
            for tokenizer in args.tokenizers:
                out = args.work_dir / f"prepared_{layout}_{size:g}mb_{tokenizer}"
                shutil.rmtree(out, ignore_errors=True)
                rec = {"size_mb": size, "layout": layout, "tokenizer": tokenizer,
                       **measure(src, out, tokenizer, args.bpe_vocab_size), "build_s": round(built, 1)}
                records.append(rec)
                print(json.dumps(rec), flush=True)
                if not args.keep:
                    shutil.rmtree(out)
            if not args.keep:
                shutil.rmtree(src.parent)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d %H:%M"),
                                    "records": records}, indent=1) + "\n")
    print("\n| size | layout | tokenizer | peak RSS MB | wall s | MB/s | MB/CPU-s | encode MB/s | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['size_mb']:g} MB | {r['layout']} | {r['tokenizer']} | {r['peak_rss_mb']} | {r['wall_s']} | "
              f"{r['mb_per_s']} | {r['mb_per_cpu_s']} | {r['encode_mb_per_s']} | {r['load_avg']} |")


if __name__ == "__main__":
    main()
