"""Tiny models, tokenizers and run directories for the Hugging Face tests (no torch needed here)."""

from __future__ import annotations

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import AddedToken, Tokenizer, processors

from dantinox_eqx.config import Config
from dantinox_eqx.data.tokenizer import char_tokenizer
from dantinox_eqx.model import Transformer
from dantinox_eqx.run import checkpoint

from .runs import write_run

TEXT = "the quick brown fox jumps over the lazy dog.\nTHE FIVE BOXING WIZARDS, 0123456789!?\n"
# A tiny shape: 2 blocks of dim 32 (4 heads of 8), context 16; vocab_size comes from the tokenizer.
SHAPE = dict(dim=32, n_heads=4, head_size=8, num_blocks=2, max_context=16, expansion=2)
# Our configs of each Hugging Face family (hf.hf_model_type picks the family from them).
FAMILY_CONFIGS = {
    "llama": dict(),
    "llama_untied_gqa_biased": dict(weight_tying=False, kv_heads=2, rope_scale_factor=2.0, rope_theta=50000.0,
                                    norm_eps=1e-5, qkv_bias=True, o_bias=True, mlp_bias=True, mlp_hidden=40),
    "qwen2": dict(qkv_bias=True, kv_heads=2),
    "mistral": dict(sliding_window=True, no_sink=True, context_window=5, weight_tying=False),
    "mixtral": dict(use_moe=True, n_experts=4, top_k_mlp=2, kv_heads=2, weight_tying=False),
    "gpt2": dict(norm_type="layernorm", use_swiglu=False, use_rotary_pos=False, absolute_pos=True,
                 trainable_pos=True),
    "gpt2_untied_biased": dict(norm_type="layernorm", use_swiglu=False, use_rotary_pos=False, absolute_pos=True,
                               trainable_pos=True, weight_tying=False, qkv_bias=True, o_bias=True, mlp_bias=True,
                               activation="relu", norm_eps=1e-5),
}


def special_tokenizer(text: str = TEXT, bos: bool = True) -> Tokenizer:
    """A char tokenizer with <s> and </s> special tokens; `bos`: prepend <s> like Llama's."""
    tok = char_tokenizer(text)
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    return tok


def perturbed(model: Transformer, seed: int = 0, std: float = 0.05) -> Transformer:
    """`model` with noise on every floating array: norms and biases (ones / zeros at init) stop
    being trivial, so a mapping that swaps or drops them shows in the logits."""
    params, static = eqx.partition(model, eqx.is_array)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return eqx.combine(jax.tree.unflatten(tree, leaves), static)


def family_model(family: str, tok: Tokenizer, seed: int = 0, **overrides) -> tuple[Config, Transformer]:
    cfg = Config(**{**SHAPE, **FAMILY_CONFIGS[family], "vocab_size": tok.get_vocab_size(), **overrides})
    return cfg, perturbed(Transformer(cfg, key=jax.random.key(seed)), seed + 1)


def family_run(run_dir: Path, family: str, tok: Tokenizer, seed: int = 0, **overrides) -> tuple[Path, Transformer]:
    """A run directory (both checkpoints at step 1) holding a perturbed model of `family`."""
    cfg, model = family_model(family, tok, seed, **overrides)
    return write_run(run_dir, cfg, tok, eqx.filter(model, eqx.is_array), 1), model


def arrays(model: Transformer) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in checkpoint.flatten(eqx.filter(model, eqx.is_array)).items()}


def tokens(vocab: int, b: int = 2, t: int = 16, seed: int = 3) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


@eqx.filter_jit
def logits(model: Transformer, toks: jax.Array) -> jax.Array:
    return model(toks)[0].astype(jnp.float32)
