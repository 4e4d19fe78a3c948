"""llama.cpp itself reads our GGUF exports: greedy text of llama.cpp on our export vs our own.

    pip install llama-cpp-python   # in another environment: it builds llama.cpp from source
    python benchmarks/llama_cpp_check.py RUN_DIR EXPORT.gguf [EXPORT.gguf ...] --llama_python PATH

For each exported file, llama.cpp (through llama-cpp-python, in the interpreter at
--llama_python, so its packages never meet ours) generates greedily from each prompt; the text is
compared with `Generator(RUN_DIR)`'s greedy text (the model the file was exported from). Writes
benchmarks/results/llama_cpp_check.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]

# Run by --llama_python: one JSON line {prompt: text} for the file in argv[1].
LLAMA = """
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False, logits_all=False)
out = {}
for p in json.loads(sys.argv[2]):
    r = llm.create_completion(p, max_tokens=int(sys.argv[3]), temperature=0.0, top_k=1)
    out[p] = r["choices"][0]["text"]
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("files", type=Path, nargs="+")
    ap.add_argument("--llama_python", required=True, help="python of an environment with llama-cpp-python")
    ap.add_argument("--new_tokens", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llama_cpp_check.json")
    args = ap.parse_args()

    from dantinox_eqx import Generator

    gen = Generator(args.run_dir, max_context=256)
    ours = {p: gen.generate(p, max_new_tokens=args.new_tokens, temperature=0.0) for p in PROMPTS}
    ours = {p: text[len(p):] if text.startswith(p) else text for p, text in ours.items()}  # the new text only
    report = {"run_dir": str(args.run_dir), "ours": ours, "files": {}}
    for f in args.files:
        r = subprocess.run([args.llama_python, "-c", LLAMA, str(f), json.dumps(PROMPTS), str(args.new_tokens)],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:  # e.g. -4: SIGILL in the build's quantised CPU kernels
            report["files"][f.name] = {"returncode": r.returncode, "error": r.stderr[-2000:]}
            continue
        theirs = json.loads(r.stdout.strip().splitlines()[-1])
        report["files"][f.name] = {"llama_cpp": theirs, "equal": {p: theirs[p] == ours[p] for p in PROMPTS}}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
