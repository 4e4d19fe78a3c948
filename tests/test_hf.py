"""Hugging Face round trips against the real library (test-only: `nox -s hf` installs torch and
transformers). Tiny randomly initialised models are built here, nothing is downloaded:

- import: a transformers model saved with save_pretrained -> from_hf -> our logits equal theirs
  (non-default eps and theta, untied heads, GQA, qkv / attention / MLP biases, sliding window,
  experts, GPT-2's biases);
- export: our runs -> export_hf -> AutoModelForCausalLM.from_pretrained -> their logits equal ours;
- a LoRA fine-tune of an imported model -> `export --format hf` -> transformers' greedy generate
  gives our text, and the tokenizer.json is the original file byte for byte.

Each test prints the measured max |logit difference| (float32 and bfloat16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.hf
REASON = "needs the test-only transformers and torch: run `nox -s hf`"
transformers = pytest.importorskip("transformers", reason=REASON)
torch = pytest.importorskip("torch", reason=REASON)

from dantinox_eqx.config import Config  # noqa: E402
from dantinox_eqx.infer.generate import Generator  # noqa: E402
from dantinox_eqx.model import cast_floating  # noqa: E402
from dantinox_eqx.run.hf import export_hf, from_hf  # noqa: E402
from dantinox_eqx.train.trainer import Trainer  # noqa: E402

from .hf_runs import FAMILY_CONFIGS, TEXT, family_run, logits, special_tokenizer, tokens  # noqa: E402

EXE = Path(sys.executable).parent / "dantinox-eqx"
F32_TOL = 1e-5
# bfloat16 keeps 8 mantissa bits: both sides round every activation, differently (our norms and
# softmax run in float32), so logits agree to a few bfloat16 steps of their magnitude.
BF16_REL_TOL = 0.05
ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
        "mixtral": "MixtralForCausalLM", "gpt2": "GPT2LMHeadModel"}
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32)
# transformers configs covering what an import must get right (name -> (config class, kwargs)).
HF_CASES = {
    "llama_gqa_untied_eps_theta": ("LlamaConfig", dict(SMALL, intermediate_size=48, num_key_value_heads=2,
                                                        rms_norm_eps=1e-5, rope_theta=5e5, tie_word_embeddings=False)),
    "llama_biased_tied": ("LlamaConfig", dict(SMALL, intermediate_size=64, attention_bias=True, mlp_bias=True,
                                               tie_word_embeddings=True)),
    "qwen2_qkv_bias": ("Qwen2Config", dict(SMALL, intermediate_size=40, num_key_value_heads=2, rms_norm_eps=1e-5,
                                           rope_theta=1e6, tie_word_embeddings=False)),
    "mistral_window": ("MistralConfig", dict(SMALL, intermediate_size=48, num_key_value_heads=2, sliding_window=5)),
    "mixtral": ("MixtralConfig", dict(SMALL, intermediate_size=24, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2)),
    "gpt2_tied": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=16, n_inner=48)),
    "gpt2_untied_relu": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=16, activation_function="relu",
                                            layer_norm_epsilon=1e-6, tie_word_embeddings=False)),
}


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([str(EXE), *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


def _randomize(model, seed: int = 0):
    """Every parameter random (transformers initialises biases to 0 and norms to 1, which would
    hide a dropped or swapped bias or norm): norms 1 + noise, the rest noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.08 * torch.randn(p.shape, generator=gen)
            p.copy_(noise + (1.0 if ("norm" in name or ".ln_" in name) and name.endswith("weight") else 0.0))
    return model.eval()


def _hf_folder(folder: Path, kind: str, kw: dict, tok, seed: int = 0):
    """A transformers model of class `kind` + our tokenizer, saved as transformers saves them."""
    config = getattr(transformers, kind)(vocab_size=tok.get_vocab_size(), bos_token_id=tok.token_to_id("<s>"),
                                         eos_token_id=tok.token_to_id("</s>"), **kw)
    torch.manual_seed(seed)
    model = _randomize(transformers.AutoModelForCausalLM.from_config(config), seed)
    model.save_pretrained(folder)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return model


def _theirs(model, toks) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(toks), dtype=torch.long)).logits.float().numpy()


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("case", list(HF_CASES))
def test_import_gives_their_logits(tmp_path, case):
    kind, kw = HF_CASES[case]
    tok = special_tokenizer(bos=not kind.startswith("GPT2"))
    theirs_model = _hf_folder(tmp_path / "hf", kind, kw, tok)
    model, cfg, _ = from_hf(tmp_path / "hf")
    toks = tokens(tok.get_vocab_size(), t=16)
    theirs = _theirs(theirs_model, toks)
    f32 = _diff(logits(model, toks), theirs)
    bf16_model = from_hf(tmp_path / "hf", dtype="bfloat16").model
    bf16 = _diff(logits(bf16_model, toks), _theirs(theirs_model.to(torch.bfloat16), toks))
    scale = float(np.abs(theirs).max())
    print(f"\nimport {case}: max|logit diff| float32 {f32:.2e}, bfloat16 {bf16:.2e} (max|logit| {scale:.2f})")
    assert f32 <= F32_TOL and bf16 <= BF16_REL_TOL * scale
    assert np.abs(np.asarray(logits(model, toks))).max() > 0.3  # not a trivially small output
    if kind == "LlamaConfig" and "rms_norm_eps" in kw:
        assert (cfg.norm_eps, cfg.rope_theta, cfg.kv_heads, cfg.weight_tying, cfg.mlp_hidden) == (
            1e-5, 5e5, 2, False, 48)
    if kind == "Qwen2Config":
        assert cfg.qkv_bias and not cfg.o_bias


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_our_exports_load_in_transformers(tmp_path, family):
    tok = special_tokenizer()
    run, model = family_run(tmp_path / "run", family, tok)
    out = export_hf(run, tmp_path / "hf")
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs_model).__name__ == ARCH[json.loads((out / "config.json").read_text())["model_type"]]
    toks = tokens(tok.get_vocab_size(), t=16)
    ours = logits(model, toks)
    f32 = _diff(_theirs(theirs_model, toks), ours)
    out16 = export_hf(run, tmp_path / "hf16", dtype="bfloat16")
    theirs16 = transformers.AutoModelForCausalLM.from_pretrained(out16, dtype=torch.bfloat16).eval()
    assert next(theirs16.parameters()).dtype == torch.bfloat16
    theirs_bf16 = np.asarray(_theirs(theirs16, toks), np.float32)
    ours_bf16 = np.asarray(logits(cast_floating(model, jnp.bfloat16), toks), np.float32)
    scale = float(np.abs(np.asarray(ours)).max())
    per_token = np.abs(theirs_bf16 - ours_bf16).max(-1)  # (batch, tokens)
    bf16 = float(per_token.max())
    print(f"\nexport {family}: max|logit diff| float32 {f32:.2e}, bfloat16 {bf16:.2e} (max|logit| {scale:.2f})")
    assert f32 <= F32_TOL
    if family == "mixtral":
        # bfloat16 rounding can flip a near-tie in the top-2 routing of a token (a discrete choice:
        # that token's logits then differ by O(1) on both sides alike); every other token agrees.
        assert float(np.mean(per_token > BF16_REL_TOL * scale)) <= 1 / 8, per_token
    else:
        assert bf16 <= BF16_REL_TOL * scale


@pytest.mark.slow
def test_lora_fine_tune_of_an_import_generates_our_text_in_transformers(tmp_path):
    """import-hf -> LoRA fine-tune -> export --format hf -> transformers' greedy generate = ours;
    tokenizer.json stays the file transformers wrote, byte for byte."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40, encoding="utf-8")
    tok = special_tokenizer()
    kw = dict(SMALL, intermediate_size=48, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=5e4,
              tie_word_embeddings=False)
    _hf_folder(tmp_path / "hf", "LlamaConfig", kw, tok)
    original = (tmp_path / "hf" / "tokenizer.json").read_bytes()

    res = cli("import-hf", tmp_path / "hf", tmp_path / "base")
    assert res.returncode == 0, res.stderr
    cfg = Config.from_yaml(tmp_path / "base" / "config.yaml").replace(
        use_lora=True, init_from=str(tmp_path / "base"), lora_targets="all", lora_rank=4, max_steps=12,
        batch_size=4, eval_interval=6, eval_iters=1, warmup_steps=0, lr=2e-2)
    ft = Trainer(cfg).fit(corpus, tmp_path / "ft")
    res = cli("export", ft, tmp_path / "out", "--format", "hf")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == original

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None  # ours does not stop at </s>: compare all 20 tokens
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (their_tok.eos_token, their_tok.bos_token, their_tok.model_max_length) == ("</s>", "<s>", 32)
    gen = Generator(ft)
    for prompt in ("the quick", "THE FIVE"):
        ids = their_tok(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == gen.encode(prompt)  # <s> first, as the tokenizer's template says
        with torch.no_grad():
            out = theirs.generate(ids, max_new_tokens=20, do_sample=False)
        theirs_text = their_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        ours_text = gen.generate(prompt, max_new_tokens=20, temperature=0.0)
        print(f"\n{prompt!r} -> {ours_text!r}")
        assert theirs_text == ours_text and len(out[0]) - ids.shape[1] == 20
    # The fine-tune changed the model: the base's greedy text differs for at least one prompt.
    base = Generator(tmp_path / "base")
    assert any(base.generate(p, 20, temperature=0.0) != gen.generate(p, 20, temperature=0.0)
               for p in ("the quick", "THE FIVE"))
