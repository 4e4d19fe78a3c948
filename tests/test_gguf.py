"""GGUF in and out (issue 22): tiny models built here, nothing downloaded.

- export -> import round trips (llama, llama with GQA / biases / untied head, qwen2 with qkv
  biases, gpt2): f32 logits equal ours; f16 / bf16 / q8_0 within their formats' precision;
- a file written here by gguf.GGUFWriter with Q8_0 / Q4_0 tensors imports to exactly the
  dequantised numpy arrays (llama.cpp's Q/K permutation undone);
- bad input: exit 2, one line naming the file / key / field, nothing written;
- marked hf: transformers' own GGUF loader reads our f32 / f16 exports (an independent reader).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from dantinox_eqx.data.tokenizer import train_bpe
from dantinox_eqx.model import Transformer
from dantinox_eqx.run import checkpoint
from dantinox_eqx.run.gguf import export_gguf, from_gguf, import_gguf
from dantinox_eqx.run.gguf_format import GGUFFormatError, gguf_vocab, permute

from .hf_runs import TEXT, family_run, logits, tokens
from .procs import assert_one_line_refusals

EXE = Path(sys.executable).parent / "dantinox-eqx"
# The round trip is exact in the weights; the metadata stores norm_eps and the RoPE base as
# float32 (relative rounding <= 6e-8), which moves float32 logits of these O(1) models by ~1e-7.
F32_TOL = 1e-5
# Stored precision of the matrices (relative to a value, or for Q8_0 to its 32-value block's max):
# f16 2^-11, bf16 2^-8, q8_0 1/254 (+ the f16 scale). Each logit passes ~10 rounded matrices
# (embedding, 2 blocks x 4, head) whose errors add with random signs: bound 10 u * max|logit|.
REL_TOL = {"f16": 10 * 2.0**-11, "bf16": 10 * 2.0**-8, "q8_0": 10 / 254}
CASES = {"llama": ("llama", {}),
         "llama_gqa_biased_untied": ("llama_untied_gqa_biased", {"mlp_hidden": 64}),
         "qwen2": ("qwen2", {}),
         "gpt2": ("gpt2", {}),
         "gpt2_untied_biased": ("gpt2_untied_biased", {"activation": "gelu"})}


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([str(EXE), *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bpe():
    """Byte-level BPE (GPT-2 regex -> llama.cpp pre "gpt-2") with <|endoftext|> as its last id."""
    return train_bpe([TEXT] * 20, 300)


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
def test_export_import_round_trip(tmp_path, bpe, case):
    family, overrides = CASES[case]
    run, model = family_run(tmp_path / "run", family, bpe, **overrides)
    toks = tokens(bpe.get_vocab_size(), t=16)
    ours = np.asarray(logits(model, toks))
    scale = float(np.abs(ours).max())
    back = from_gguf(export_gguf(run, tmp_path / "f32.gguf"))
    f32 = _diff(logits(back.model, toks), ours)
    cfg, got = run_config(run), back.config
    assert (got.kv_heads, got.weight_tying, got.qkv_bias, got.o_bias, got.mlp_bias, got.mlp_width) == (
        cfg.kv_heads, cfg.weight_tying, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.mlp_width)
    assert back.tokenizer.encode(TEXT).ids == bpe.encode(TEXT).ids
    diffs = {}
    for dtype in REL_TOL:
        diffs[dtype] = _diff(logits(from_gguf(export_gguf(run, tmp_path / f"{dtype}.gguf", dtype=dtype)).model,
                                    toks), ours)
    print(f"\n{case}: max|logit diff| f32 {f32:.2e}, " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
          + f" (max|logit| {scale:.2f})")
    assert f32 <= F32_TOL and scale > 0.3
    for dtype, d in diffs.items():
        assert 0 < d <= REL_TOL[dtype] * scale, (dtype, d)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "q8_0.gguf").tensors}
    assert types["token_embd.weight"] == Q.Q8_0 and types["output_norm.weight"] == Q.F32


def run_config(run: Path):
    from dantinox_eqx.run.pretrained import load_config

    return load_config(run)


# --------------------------------------------------------------------------- files written here
SHAPE = dict(D=32, H=4, K=2, E=8, F=64, L=1)


def _write(path: Path, tok, tensors: dict[str, tuple[np.ndarray, Q]], arch: str = "llama", **meta) -> Path:
    """A GGUF file as llama.cpp's converter lays it out: `tensors` {name: (float32 array, type)}."""
    writer = gguf.GGUFWriter(None, arch)
    D, H, K, E, F, L = SHAPE.values()
    values = {"block_count": L, "context_length": 16, "embedding_length": D, "feed_forward_length": F,
              "attention.head_count": H, "attention.head_count_kv": K, "rope.freq_base": 10000.0,
              "attention.layer_norm_rms_epsilon": 1e-5} | meta
    for key, value in values.items():
        (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(f"{arch}.{key}", value)
    vocab = gguf_vocab(tok, tok.get_vocab_size())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["token_type"])
    writer.add_token_merges(vocab["merges"])
    writer.add_eos_token_id(tok.get_vocab_size() - 1)
    for name, (x, qtype) in tensors.items():
        writer.add_tensor(name, x if qtype in (Q.F32, Q.I8) else gguf.quants.quantize(x, qtype),
                          raw_dtype=None if qtype in (Q.F32, Q.I8) else qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama_tensors(V: int, seed: int = 0) -> dict[str, tuple[np.ndarray, Q]]:
    """One llama block, matrices Q8_0 / Q4_0 (numpy order: Linear weights (out, in))."""
    D, H, K, E, F, _ = SHAPE.values()
    rng = np.random.default_rng(seed)
    r = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    ones = lambda n: (1 + r(n)).astype(np.float32)  # noqa: E731
    return {"token_embd.weight": (r(V, D), Q.Q8_0), "output_norm.weight": (ones(D), Q.F32),
            "blk.0.attn_norm.weight": (ones(D), Q.F32), "blk.0.ffn_norm.weight": (ones(D), Q.F32),
            "blk.0.attn_q.weight": (r(H * E, D), Q.Q4_0), "blk.0.attn_k.weight": (r(K * E, D), Q.Q8_0),
            "blk.0.attn_v.weight": (r(K * E, D), Q.Q4_0), "blk.0.attn_output.weight": (r(D, H * E), Q.Q8_0),
            "blk.0.ffn_gate.weight": (r(F, D), Q.Q4_0), "blk.0.ffn_up.weight": (r(F, D), Q.Q8_0),
            "blk.0.ffn_down.weight": (r(D, F), Q.Q4_0)}


def test_quantised_file_imports_as_dequantised_numpy(tmp_path, bpe):
    V = bpe.get_vocab_size()
    ts = _llama_tensors(V)
    model, cfg, tok = from_gguf(_write(tmp_path / "q.gguf", bpe, ts))
    deq = {n: gguf.quants.dequantize(gguf.quants.quantize(x, q), q) if q != Q.F32 else x for n, (x, q) in ts.items()}
    D, H, K, E, F, _ = SHAPE.values()
    # llama.cpp's file holds permute(W_q); ours is the Hugging Face layout, transposed to (in, out)
    unperm = {n: deq[n].reshape(h, E // 2, 2, D).swapaxes(1, 2).reshape(h * E, D)
              for n, h in (("blk.0.attn_q.weight", H), ("blk.0.attn_k.weight", K))}
    assert all(np.array_equal(permute(unperm[n], h), deq[n]) for n, h in (("blk.0.attn_q.weight", H),
                                                                           ("blk.0.attn_k.weight", K)))
    ours = {k: np.asarray(v) for k, v in checkpoint.flatten(eqx.filter(model, eqx.is_array)).items()}
    want = {"embedding": deq["token_embd.weight"], "norm.scale": deq["output_norm.weight"],
            "blocks.attn_norm.scale": deq["blk.0.attn_norm.weight"][None],
            "blocks.attn.qkv.weight": np.concatenate([unperm["blk.0.attn_q.weight"], unperm["blk.0.attn_k.weight"],
                                                      deq["blk.0.attn_v.weight"]]).T[None],
            "blocks.attn.o.weight": deq["blk.0.attn_output.weight"].T[None],
            "blocks.mlp.up.weight": np.concatenate([deq["blk.0.ffn_gate.weight"],
                                                    deq["blk.0.ffn_up.weight"]]).T[None],
            "blocks.mlp.down.weight": deq["blk.0.ffn_down.weight"].T[None]}
    assert set(ours) == set(want) | {"blocks.mlp_norm.scale"}
    for name, w in want.items():
        np.testing.assert_array_equal(ours[name], w, err_msg=name)
    # the quantisation really happened: Q4_0 is far from the float32 weights, Q8_0 close
    assert 1e-3 < _diff(deq["blk.0.attn_q.weight"], ts["blk.0.attn_q.weight"][0]) < 0.1
    assert (cfg.kv_heads, cfg.weight_tying, cfg.norm_eps, cfg.head_size) == (K, True, pytest.approx(1e-5), E)
    assert isinstance(model, Transformer) and tok.get_vocab_size() == V


@pytest.mark.slow
def test_bad_input_exits_2_naming_the_file_and_writes_nothing(tmp_path, bpe):
    V = bpe.get_vocab_size()
    good = _write(tmp_path / "good.gguf", bpe, _llama_tensors(V))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-100])
    falcon = _write(tmp_path / "falcon.gguf", bpe, _llama_tensors(V), arch="falcon")
    ints = _llama_tensors(V)
    ints["blk.0.attn_norm.weight"] = (np.ones(SHAPE["D"], np.int8), Q.I8)
    int_file = _write(tmp_path / "ints.gguf", bpe, ints)
    wrong = _write(tmp_path / "wrong.gguf", bpe, _llama_tensors(V), feed_forward_length=96)
    run, _ = family_run(tmp_path / "run", "llama", bpe)
    taken = tmp_path / "taken.gguf"
    taken.write_text("x")
    cases = [(("import-gguf", truncated, tmp_path / "r1"), "truncated.gguf", tmp_path / "r1"),
             (("import-gguf", falcon, tmp_path / "r2"), "general.architecture is 'falcon'", tmp_path / "r2"),
             (("import-gguf", int_file, tmp_path / "r3"), "'blk.0.attn_norm.weight' has type I8", tmp_path / "r3"),
             (("import-gguf", wrong, tmp_path / "r4"),
              "'blk.0.ffn_down.weight' has shape (32, 64), the metadata implies (32, 96)", tmp_path / "r4"),
             (("export", run, taken, "--format", "gguf"), "is not an empty file", None)]
    assert_one_line_refusals(cli, cases)
    assert taken.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["good.gguf", "truncated.gguf", "falcon.gguf", "ints.gguf", "wrong.gguf", "run", "taken.gguf"])


def test_refusals_name_the_field(tmp_path, bpe):
    from dantinox_eqx.data.tokenizer import char_tokenizer

    char_run, _ = family_run(tmp_path / "char", "llama", char_tokenizer(TEXT))
    with pytest.raises(GGUFFormatError, match="tokenizer_type: a char tokenizer"):
        export_gguf(char_run, tmp_path / "c.gguf")
    window, _ = family_run(tmp_path / "window", "mistral", bpe)
    with pytest.raises(GGUFFormatError, match="sliding_window"):
        export_gguf(window, tmp_path / "w.gguf")
    relu, _ = family_run(tmp_path / "relu", "gpt2_untied_biased", bpe)
    with pytest.raises(GGUFFormatError, match="activation"):
        export_gguf(relu, tmp_path / "r.gguf")
    assert not any(p.suffix == ".gguf" for p in tmp_path.iterdir())


def test_import_writes_a_run_with_special_tokens_and_chat_template(tmp_path, bpe):
    run, model = family_run(tmp_path / "run", "llama", bpe)
    (run / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    out = export_gguf(run, tmp_path / "m.gguf")
    imported = import_gguf(out, tmp_path / "imported")
    assert (imported / "chat_template.jinja").read_text() == (run / "chat_template.jinja").read_text()
    import json

    record = json.loads((imported / "hf_import.json").read_text())
    assert record["special_tokens"]["eos_token"] == "<|endoftext|>" and record["format"] == "gguf"
    from dantinox_eqx.run.pretrained import from_pretrained

    toks = tokens(bpe.get_vocab_size(), t=16)
    assert _diff(logits(from_pretrained(imported), toks), logits(model, toks)) <= F32_TOL


# --------------------------------------------------------------------------- transformers reads our files
# transformers' GGUF loader is an independent reader of our exports. It has two limits of its own,
# so these shapes avoid them: it keeps no llama biases (attention_bias / mlp_bias are not GGUF keys:
# llama.cpp reads the tensors, transformers drops them) and builds GPT-2 with n_positions 1024 and
# n_inner 4 * n_embd whatever the file says.
HF_CASES = {"llama_gqa_untied_rope_scaled": ("llama_untied_gqa_biased", {"mlp_hidden": 64, "qkv_bias": False,
                                                                         "o_bias": False, "mlp_bias": False}),
            "qwen2_qkv_bias": ("qwen2", {}),
            "gpt2": ("gpt2_untied_biased", {"activation": "gelu", "max_context": 1024, "expansion": 4})}


@pytest.mark.hf
@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_reads_our_exports(tmp_path, bpe, case):
    transformers = pytest.importorskip("transformers", reason="needs the test-only transformers: `nox -s hf`")
    torch = pytest.importorskip("torch")
    from dantinox_eqx.infer.generate import Generator

    family, overrides = HF_CASES[case]
    run, model = family_run(tmp_path / "run", family, bpe, **overrides)
    toks = tokens(bpe.get_vocab_size(), t=16)
    ours = np.asarray(logits(model, toks))
    scale = float(np.abs(ours).max())
    for dtype in ("f32", "f16"):
        export_gguf(run, tmp_path / f"{dtype}.gguf", dtype=dtype)
        theirs_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"{dtype}.gguf",
                                                                         dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = theirs_model(torch.tensor(np.asarray(toks))).logits.numpy()
        # ours of the same file: both sides compute with the same float32 weights (test_hf's bound)
        same_file = _diff(theirs, logits(from_gguf(tmp_path / f"{dtype}.gguf").model, toks))
        to_original = _diff(theirs, ours)
        print(f"\n{case} {dtype}: max|logit diff| theirs vs ours (same file) {same_file:.2e}, "
              f"vs our run {to_original:.2e} (max|logit| {scale:.2f})")
        assert same_file <= F32_TOL
        assert to_original <= (F32_TOL if dtype == "f32" else REL_TOL[dtype] * scale)
        their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=f"{dtype}.gguf")
        for text in ("the quick brown fox", "THE FIVE BOXING 0123!?", " two  spaces\nand a line"):
            assert their_tok(text).input_ids == bpe.encode(text).ids, text
        gen = Generator(import_gguf(tmp_path / f"{dtype}.gguf", tmp_path / f"run_{dtype}"))
        theirs_model.generation_config.eos_token_id = None  # compare all 12 tokens
        for prompt in ("the quick", "THE FIVE"):
            ids = their_tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = theirs_model.generate(ids, max_new_tokens=12, do_sample=False)
            assert their_tok.decode(out[0, ids.shape[1]:]) == gen.generate(prompt, 12, temperature=0.0), prompt


def test_lora_merged_and_chat_template_inherited(tmp_path, bpe):
    """to_gguf merges adapters (logits of the file = the merged model's); a fine-tune without a
    template of its own exports its init_from base run's chat_template.jinja."""
    import jax

    from dantinox_eqx.lora import apply_lora, merge_lora
    from dantinox_eqx.run.gguf import to_gguf

    from .hf_runs import family_model
    from .runs import write_run

    cfg, base_model = family_model("qwen2", bpe)
    lora = apply_lora(base_model, "all", rank=4, key=jax.random.key(1))
    is_lora = lambda x: hasattr(x, "lora_b")  # noqa: E731
    mods = [x for x in jax.tree.leaves(lora, is_leaf=is_lora) if is_lora(x)]
    where = lambda m: [x.lora_b for x in jax.tree.leaves(m, is_leaf=is_lora) if is_lora(x)]  # noqa: E731
    lora = eqx.tree_at(where, lora, [0.1 * jax.random.normal(jax.random.key(i), m.lora_b.shape)
                                     for i, m in enumerate(mods)])
    toks = tokens(bpe.get_vocab_size(), t=16)
    merged = np.asarray(logits(merge_lora(lora), toks))
    assert _diff(merged, logits(base_model, toks)) > 0.01  # the adapters change the output
    back = from_gguf(to_gguf(lora, cfg.replace(use_lora=True, lora_rank=4), bpe, tmp_path / "lora.gguf"))
    assert _diff(logits(back.model, toks), merged) <= F32_TOL

    base = write_run(tmp_path / "base", cfg, bpe, eqx.filter(base_model, eqx.is_array), 1)
    (base / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tuned = write_run(tmp_path / "tuned", cfg.replace(init_from=str(base)), bpe,
                      eqx.filter(base_model, eqx.is_array), 2)
    out = export_gguf(tuned, tmp_path / "tuned.gguf")
    field = gguf.GGUFReader(out).fields["tokenizer.chat_template"]
    assert field.contents() == (base / "chat_template.jinja").read_text()
