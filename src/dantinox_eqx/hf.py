"""Hugging Face format: import a local Hugging Face checkpoint folder, export a run as one.

    run = import_hf("llama_dir", "runs/llama")        # a run directory (generate, eval, fine-tune)
    model, config, tokenizer = from_hf("llama_dir")   # or the model in memory
    export_hf("runs/my_run", "my_run_hf")             # AutoModelForCausalLM.from_pretrained loads it

Nothing here imports `transformers` or `torch`: the files are read and written with
`safetensors`, `tokenizers` and `json` (the tests check the results against `transformers`).

Families (`model_type`), and the configs they correspond to:

    llama    RMSNorm, RoPE, SwiGLU MLP, GQA; Llama's attention_bias = qkv_bias + o_bias, mlp_bias
    mistral  llama + sliding_window (ours: sliding_window: true, no_sink: true, context_window: W)
    qwen2    llama + qkv_bias (q, k and v biased, o not)
    mixtral  llama attention + dropless top-k SwiGLU experts (use_moe, capacity_factor: 0)
    gpt2     LayerNorm, learned absolute positions, non-gated MLP (gelu = GPT-2's gelu_new,
             tanh form), biases on every projection (ours: qkv_bias, o_bias, mlp_bias; an export
             of a run without them writes zeros, an import keeps only the non-zero ones)

Export picks the family from the config and refuses, naming the field, what Hugging Face cannot
express: mla, a sliding window with its attention sink (no_sink: false), capacity_factor > 0,
shared_expert, sinusoidal absolute positions, NoPE, LayerNorm with RoPE or SwiGLU, a non-gated
MLP with RMSNorm, an o bias without qkv biases, biases on mixtral or mistral. Import refuses any
other model_type, RoPE scaling other than plain (`rope_type: default`), head_dim * heads != hidden,
non-SiLU gated MLPs and GPT-2 variants with other attention scaling, naming the config.json key.

Weight layouts (ours -> Hugging Face; ours are stacked over blocks, block i is row i):

    ours (in, out), y = x @ W              Llama / Mixtral: nn.Linear (out, in), y = x @ W.T
    blocks.attn.qkv.weight (D, (H+2K)E)    q_proj = W[:, :HE].T, k_proj = W[:, HE:(H+K)E].T,
                                           v_proj = W[:, (H+K)E:].T (heads contiguous, no permutation:
                                           both RoPEs rotate half of each whole head)
    blocks.attn.qkv_bias ((H+2K)E,)        q_proj.bias | k_proj.bias | v_proj.bias
    blocks.attn.o.weight (HE, D)           o_proj = W.T
    blocks.mlp.up.weight (D, 2F)           gate_proj = W[:, :F].T, up_proj = W[:, F:].T
    blocks.mlp.down.weight (F, D)          down_proj = W.T
    blocks.mlp.router.weight (D, E)        block_sparse_moe.gate = W.T
    blocks.mlp.up.weight (E, D, 2F)        experts.{j}.w1 = W[j][:, :F].T (gate), w3 = W[j][:, F:].T (up)
    blocks.mlp.down.weight (E, F, D)       experts.{j}.w2 = W[j].T
    blocks.{attn,mlp}_norm.scale, norm.scale   input_layernorm, post_attention_layernorm, model.norm
    embedding (V, D), head.weight (D, V)   model.embed_tokens (V, D), lm_head = head.T (absent when tied)

    GPT-2's Conv1D stores (in, out) like ours: c_attn = qkv (q | k | v), c_proj = o, c_fc = up,
    mlp.c_proj = down, ln_1 / ln_2 / ln_f = the norms (weight = scale, bias), wte = embedding,
    wpe = pos_embedding (its rows = max_context).

Our RoPE base is rope_theta (10000 when null) * rope_scale_factor^(E / (E - 2)) (NTK scaling);
it exports as one `rope_theta`. RMSNorm epsilon is norm_eps (1e-6 by default; Llama's 1e-5
changes logits by ~3e-3, so it travels in the config).

An imported run directory holds config.yaml, tokenizer.json (the folder's file, byte for byte),
checkpoints best + latest (step 0) and hf_import.json (source folder, model_type and the
bos / eos / pad / unk tokens, which our tokenizer.json alone does not name). An export writes
config.json, generation_config.json, model.safetensors (one file), tokenizer.json (the run's,
byte for byte) and tokenizer_config.json (PreTrainedTokenizerFast with those special tokens and
model_max_length = max_context). A run fine-tuned from an imported one finds the special tokens
through its init_from chain.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tokenizers import Tokenizer, models

from . import checkpoint
from .config import Config, ConfigError, atomic_write_text
from .export import parse_dtype, plain_model
from .model import Transformer, rope_base
from .tokenizer import TokenizerError, load_tokenizer, save_tokenizer

__all__ = ["HFFormatError", "HFModel", "from_hf", "import_hf", "to_hf", "export_hf", "hf_model_type",
           "hf_config", "config_from_hf", "FAMILIES", "IMPORT_FILE"]

FAMILIES = ("llama", "mistral", "qwen2", "mixtral", "gpt2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "gpt2": "GPT2LMHeadModel"}
IMPORT_FILE = "hf_import.json"  # in an imported run: source, model_type, special tokens
CONFIG_JSON, WEIGHTS, INDEX, TOKENIZER = ("config.json", "model.safetensors", "model.safetensors.index.json",
                                          "tokenizer.json")
ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
# Special-token roles guessed by name when a run records none (e.g. a BPE run with added tokens).
ROLE_GUESSES = {"bos_token": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
                "eos_token": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"),
                "pad_token": ("<pad>", "<|pad|>", "[PAD]"), "unk_token": ("<unk>", "[UNK]")}
# Hugging Face's own defaults for keys a config.json may leave out (transformers' config classes).
HF_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu"},
    "mistral": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu"},
    "qwen2": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu"},
    "mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False, "hidden_act": "silu",
                "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001},
    "gpt2": {"layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "activation_function": "gelu_new",
             "n_positions": 1024, "n_inner": None, "scale_attn_weights": True,
             "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False},
}
GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
# Tensors a Hugging Face file may hold that are buffers, not weights: skipped on import.
BUFFER_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


class HFFormatError(ConfigError):
    """A Hugging Face folder or a run that cannot be converted; the message names the file or field."""


class HFModel(NamedTuple):
    """What `from_hf` returns: the model (float32 or bfloat16 arrays), its Config, its tokenizer."""

    model: Transformer
    config: Config
    tokenizer: Tokenizer


# --------------------------------------------------------------------------- name maps
class Part(NamedTuple):
    """One Hugging Face tensor cut from one of our arrays.

    `ours` is our flat name (`checkpoint.flatten`); names under `blocks.` have a leading block
    axis and `hf` then holds `{i}` (and `{j}` for an expert axis). `cols` = (start, stop) on the
    last axis (fused qkv, [gate | up]); `linear`: PyTorch nn.Linear, stored (out, in) = ours.T.
    """

    ours: str
    hf: str
    cols: tuple[int, int] | None = None
    linear: bool = False


def _llama_attention(cfg: Config, pre: str) -> list[Part]:
    H, K, E = cfg.n_heads, cfg.effective_kv_heads, cfg.head_size
    spans = {"q": (0, H * E), "k": (H * E, (H + K) * E), "v": ((H + K) * E, (H + 2 * K) * E)}
    parts = [Part("blocks.attn.qkv.weight", f"{pre}{n}_proj.weight", s, True) for n, s in spans.items()]
    parts.append(Part("blocks.attn.o.weight", f"{pre}o_proj.weight", None, True))
    if cfg.qkv_bias:
        parts += [Part("blocks.attn.qkv_bias", f"{pre}{n}_proj.bias", s) for n, s in spans.items()]
    if cfg.o_bias:
        parts.append(Part("blocks.attn.o_bias", f"{pre}o_proj.bias"))
    return parts


def _llama_parts(cfg: Config) -> list[Part]:
    F, layer = cfg.mlp_width, "model.layers.{i}."
    parts = [Part("embedding", "model.embed_tokens.weight"), Part("norm.scale", "model.norm.weight"),
             Part("blocks.attn_norm.scale", layer + "input_layernorm.weight"),
             Part("blocks.mlp_norm.scale", layer + "post_attention_layernorm.weight"),
             *_llama_attention(cfg, layer + "self_attn.")]
    if not cfg.weight_tying:
        parts.append(Part("head.weight", "lm_head.weight", None, True))
    if cfg.use_moe:
        moe = layer + "block_sparse_moe."
        return parts + [Part("blocks.mlp.router.weight", moe + "gate.weight", None, True),
                        Part("blocks.mlp.up.weight", moe + "experts.{j}.w1.weight", (0, F), True),
                        Part("blocks.mlp.up.weight", moe + "experts.{j}.w3.weight", (F, 2 * F), True),
                        Part("blocks.mlp.down.weight", moe + "experts.{j}.w2.weight", None, True)]
    mlp = layer + "mlp."
    parts += [Part("blocks.mlp.up.weight", mlp + "gate_proj.weight", (0, F), True),
              Part("blocks.mlp.up.weight", mlp + "up_proj.weight", (F, 2 * F), True),
              Part("blocks.mlp.down.weight", mlp + "down_proj.weight", None, True)]
    if cfg.mlp_bias:
        parts += [Part("blocks.mlp.up_bias", mlp + "gate_proj.bias", (0, F)),
                  Part("blocks.mlp.up_bias", mlp + "up_proj.bias", (F, 2 * F)),
                  Part("blocks.mlp.down_bias", mlp + "down_proj.bias")]
    return parts


def _gpt2_parts(cfg: Config) -> list[Part]:
    """GPT-2 always has every bias: `cfg` here has qkv_bias, o_bias and mlp_bias switched on."""
    h = "transformer.h.{i}."
    parts = [Part("embedding", "transformer.wte.weight"), Part("pos_embedding", "transformer.wpe.weight"),
             Part("norm.scale", "transformer.ln_f.weight"), Part("norm.bias", "transformer.ln_f.bias")]
    for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        parts += [Part(f"blocks.{ours}.scale", f"{h}{theirs}.weight"), Part(f"blocks.{ours}.bias", f"{h}{theirs}.bias")]
    for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                         ("mlp.down", "mlp.c_proj")):
        bias = {"attn.qkv": "attn.qkv_bias", "attn.o": "attn.o_bias", "mlp.up": "mlp.up_bias",
                "mlp.down": "mlp.down_bias"}[ours]
        parts += [Part(f"blocks.{ours}.weight", f"{h}{theirs}.weight"), Part(f"blocks.{bias}", f"{h}{theirs}.bias")]
    if not cfg.weight_tying:
        parts.append(Part("head.weight", "lm_head.weight", None, True))
    return parts


def _parts(cfg: Config, family: str) -> list[Part]:
    return _gpt2_parts(cfg) if family == "gpt2" else _llama_parts(cfg)


def _piece(x: Any, part: Part) -> Any:
    """Our array (one block / expert) -> the Hugging Face tensor. Array methods only, so it runs
    on numpy arrays (export) and under `jax.eval_shape` (the expected shapes of an import)."""
    if part.cols is not None:
        x = x[..., part.cols[0]:part.cols[1]]
    return x.T if part.linear else x


def _hf_tensors(ours: dict[str, Any], parts: list[Part], n_blocks: int, n_experts: int) -> dict[str, Any]:
    """{Hugging Face name: tensor} from our flat arrays."""
    out = {}
    for p in parts:
        if not p.ours.startswith("blocks."):
            out[p.hf] = _piece(ours[p.ours], p)
            continue
        for i in range(n_blocks):
            x = ours[p.ours][i]
            if "{j}" in p.hf:
                out.update({p.hf.format(i=i, j=j): _piece(x[j], p) for j in range(n_experts)})
            else:
                out[p.hf.format(i=i)] = _piece(x, p)
    return out


def _our_arrays(get: Callable[[str], np.ndarray], parts: list[Part], n_blocks: int, n_experts: int
                ) -> dict[str, np.ndarray]:
    """The inverse of `_hf_tensors`: our flat arrays from `get(Hugging Face name)`."""
    groups: dict[str, list[Part]] = {}
    for p in parts:
        groups.setdefault(p.ours, []).append(p)

    def join(ps: list[Part], **ij: int) -> np.ndarray:
        pieces = [get(p.hf.format(**ij)) for p in ps]
        pieces = [x.T if p.linear else x for p, x in zip(ps, pieces)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=-1)

    out = {}
    for name, ps in groups.items():
        if not name.startswith("blocks."):
            out[name] = join(ps)
        elif "{j}" in ps[0].hf:
            out[name] = np.stack([np.stack([join(ps, i=i, j=j) for j in range(n_experts)]) for i in range(n_blocks)])
        else:
            out[name] = np.stack([join(ps, i=i) for i in range(n_blocks)])
    return out


# --------------------------------------------------------------------------- configs
def _refuse(field: str, why: str) -> None:
    raise HFFormatError(f"{field}: {why}; Hugging Face's llama / mistral / qwen2 / mixtral / gpt2 cannot "
                        "express it, so this run does not export in --format hf")


def hf_model_type(cfg: Config) -> str:
    """The Hugging Face `model_type` that expresses `cfg` exactly (module docstring), or
    HFFormatError naming the first field that none can express."""
    if cfg.mla:
        _refuse("mla", "multi-head latent attention")
    if cfg.sliding_window and not cfg.no_sink:
        _refuse("no_sink", "the sliding window keeps token 0 visible as an attention sink")
    if cfg.absolute_pos and not cfg.trainable_pos:
        _refuse("trainable_pos", "sinusoidal absolute positions")
    if cfg.norm_type == "layernorm":  # GPT-2: learned positions, plain MLP, biases
        for field, bad, why in (("use_rotary_pos", cfg.use_rotary_pos, "LayerNorm models export as GPT-2, "
                                 "which has learned absolute positions, not RoPE"),
                                ("absolute_pos", not cfg.absolute_pos, "GPT-2 needs learned absolute positions "
                                 "(absolute_pos and trainable_pos)"),
                                ("use_swiglu", cfg.use_swiglu, "GPT-2's MLP is not gated"),
                                ("use_moe", cfg.use_moe, "GPT-2 has no experts"),
                                ("kv_heads", cfg.effective_kv_heads != cfg.n_heads, "GPT-2 has no grouped-query "
                                 "attention"),
                                ("sliding_window", cfg.sliding_window, "GPT-2 has no sliding window")):
            if bad:
                _refuse(field, why)
        return "gpt2"
    if cfg.absolute_pos:
        _refuse("absolute_pos", "RMSNorm models export as Llama, which has RoPE and no position table")
    if not cfg.use_rotary_pos:
        _refuse("use_rotary_pos", "a model without positions (NoPE)")
    if not cfg.use_swiglu:
        _refuse("use_swiglu", f"a non-gated {cfg.activation} MLP with RMSNorm")
    if cfg.use_moe:
        for field, bad in (("capacity_factor", cfg.capacity_factor > 0), ("shared_expert", cfg.shared_expert),
                           ("qkv_bias", cfg.qkv_bias), ("o_bias", cfg.o_bias)):
            if bad:
                _refuse(field, "Mixtral's experts are dropless and unshared, its attention unbiased")
        return "mixtral"
    if cfg.qkv_bias and not cfg.o_bias:
        for field, bad in (("mlp_bias", cfg.mlp_bias), ("sliding_window", cfg.sliding_window)):
            if bad:
                _refuse(field, "qkv biases without an o bias export as Qwen2, which has neither")
        return "qwen2"
    if cfg.o_bias != cfg.qkv_bias:
        _refuse("o_bias", "Llama's attention_bias biases q, k, v and o together")
    if cfg.sliding_window:
        for field, bad in (("qkv_bias", cfg.qkv_bias), ("mlp_bias", cfg.mlp_bias)):
            if bad:
                _refuse(field, "a sliding window exports as Mistral, which has no biases")
        return "mistral"
    return "llama"


def hf_config(cfg: Config, special_ids: dict[str, int] | None = None, dtype: str = "float32") -> dict[str, Any]:
    """The Hugging Face config.json of `cfg` (whose vocab_size is set). `special_ids`: the
    bos/eos/pad token ids ({"bos_token": 1, ...}); `dtype` names the weights' dtype."""
    family = hf_model_type(cfg)
    V, D, L, H, C = cfg.vocab_size, cfg.dim, cfg.num_blocks, cfg.n_heads, cfg.max_context
    ids = {f"{role}_id": (special_ids or {}).get(role) for role in ("bos_token", "eos_token", "pad_token")}
    common = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": V,
              "tie_word_embeddings": cfg.weight_tying, "dtype": dtype, "torch_dtype": dtype, **ids}
    if family == "gpt2":
        p = cfg.dropout_rate
        return {**common, "n_embd": D, "n_layer": L, "n_head": H, "n_positions": C, "n_inner": cfg.mlp_width,
                "activation_function": "gelu_new" if cfg.activation == "gelu" else cfg.activation,
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "initializer_range": 0.02, "use_cache": True}
    theta = rope_base(cfg.head_size, cfg.rope_scale_factor, cfg.effective_rope_theta)
    out = {**common, "hidden_size": D, "intermediate_size": cfg.mlp_width, "num_hidden_layers": L,
           "num_attention_heads": H, "num_key_value_heads": cfg.effective_kv_heads, "head_dim": cfg.head_size,
           "hidden_act": "silu", "max_position_embeddings": C, "rms_norm_eps": cfg.norm_eps,
           # both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta
           "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
           "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True}
    window = cfg.context_window if cfg.sliding_window else None
    if family == "llama":
        out |= {"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias}
    elif family == "mistral":
        out |= {"sliding_window": window}
    elif family == "qwen2":
        out |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": L}
    else:
        out |= {"num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k_mlp,
                "router_aux_loss_coef": cfg.alpha_balance, "router_jitter_noise": 0.0,
                "output_router_logits": False, "sliding_window": window}
    return out


def _key(hf: dict[str, Any], family: str, name: str) -> Any:
    """config.json's `name`, else Hugging Face's default for the family; HFFormatError if neither."""
    if hf.get(name) is not None:
        return hf[name]
    if name in HF_DEFAULTS[family]:
        return HF_DEFAULTS[family][name]
    raise HFFormatError(f"config.json: {name} is missing; a {family} config.json needs it")


def _rope_theta(hf: dict[str, Any], family: str) -> float:
    """Plain RoPE's base from rope_parameters (transformers 5) or rope_theta (4.x); other RoPE
    kinds (llama3, yarn, linear, dynamic, partial rotary) are refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for key, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = block.get("rope_type", block.get("type", "default"))
        if kind != "default":
            raise HFFormatError(f"config.json: {key}.rope_type is {kind!r}; only plain RoPE (rope_type "
                                "'default') imports, our RoPE has no such scaling")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFFormatError("config.json: partial_rotary_factor must be 1 (our RoPE rotates whole heads)")
    return float(params.get("rope_theta", hf.get("rope_theta", HF_DEFAULTS[family]["rope_theta"])))


def config_from_hf(hf: dict[str, Any], *, max_context: int | None = None) -> tuple[Config, str]:
    """(our Config, family) for a Hugging Face config.json mapping; HFFormatError naming the
    config.json key for what we cannot express. `max_context` replaces max_position_embeddings
    (shorter training windows and KV caches) for RoPE models; GPT-2's position table fixes it."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise HFFormatError(f"config.json: model_type {family!r} is not supported; import one of "
                            f"{', '.join(FAMILIES)}")
    k = lambda name: _key(hf, family, name)
    if family == "gpt2":
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if k(name) != HF_DEFAULTS["gpt2"][name]:
                raise HFFormatError(f"config.json: {name}: {k(name)!r} is not GPT-2's standard attention; "
                                    f"only {name}: {HF_DEFAULTS['gpt2'][name]} imports")
        act = k("activation_function")
        if act not in GPT2_ACTIVATIONS:
            raise HFFormatError(f"config.json: activation_function {act!r} has no equivalent here; one of "
                                f"{', '.join(GPT2_ACTIVATIONS)} imports")
        D, H, C = k("n_embd"), k("n_head"), k("n_positions")
        if max_context not in (None, C):
            raise HFFormatError(f"max_context: a gpt2 model's learned position table has n_positions={C} rows; "
                                "its max_context cannot differ")
        if D % H:
            raise HFFormatError(f"config.json: n_embd={D} is not a multiple of n_head={H}")
        fields = dict(dim=D, n_heads=H, head_size=D // H, num_blocks=k("n_layer"), max_context=C,
                      norm_type="layernorm", norm_eps=k("layer_norm_epsilon"), use_swiglu=False,
                      activation=GPT2_ACTIVATIONS[act], use_rotary_pos=False, absolute_pos=True,
                      trainable_pos=True, qkv_bias=True, o_bias=True, mlp_bias=True,
                      mlp_hidden=k("n_inner") or 4 * D)
    else:
        if k("hidden_act") != "silu":
            raise HFFormatError(f"config.json: hidden_act {k('hidden_act')!r}: only SiLU-gated (SwiGLU) MLPs import")
        D, H = k("hidden_size"), k("num_attention_heads")
        E = hf.get("head_dim") or D // H
        if H * E != D:
            raise HFFormatError(f"config.json: head_dim={E} * num_attention_heads={H} != hidden_size={D}; "
                                "our attention needs dim = n_heads * head_size")
        if family == "qwen2" and (hf.get("use_sliding_window")
                                  or any(t != "full_attention" for t in hf.get("layer_types") or [])):
            raise HFFormatError("config.json: use_sliding_window / layer_types: Qwen2's per-layer sliding "
                                "window has no equivalent here; only full attention imports")
        window = hf.get("sliding_window") if family in ("mistral", "mixtral") else None
        bias = bool(hf.get("attention_bias", False))
        fields = dict(dim=D, n_heads=H, head_size=E, num_blocks=k("num_hidden_layers"),
                      kv_heads=None if hf.get("num_key_value_heads") in (None, H) else hf["num_key_value_heads"],
                      max_context=max_context or k("max_position_embeddings"),
                      norm_eps=k("rms_norm_eps"), rope_theta=_rope_theta(hf, family), use_swiglu=True,
                      qkv_bias=bias or family == "qwen2", o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                      mlp_hidden=k("intermediate_size"), sliding_window=window is not None,
                      no_sink=window is not None, context_window=window or Config.context_window)
        if family == "mixtral":
            fields |= dict(use_moe=True, n_experts=k("num_local_experts"), top_k_mlp=k("num_experts_per_tok"),
                           capacity_factor=0.0, alpha_balance=k("router_aux_loss_coef"))
    F = fields["mlp_hidden"]
    if F % fields["dim"] == 0:  # an integer expansion says it as our configs usually do
        fields |= dict(expansion=F // fields["dim"], mlp_hidden=None)
    try:
        cfg = Config(vocab_size=k("vocab_size"), weight_tying=bool(k("tie_word_embeddings")), **fields)
    except ConfigError as e:
        raise HFFormatError(f"config.json: cannot be expressed here: {e}") from None
    return cfg, family


def _shapes(cfg: Config) -> tuple[Any, Any]:
    """(the arrays of `Transformer(cfg)` as ShapeDtypeStructs, the rest): nothing computed."""
    skeleton = eqx.filter_eval_shape(Transformer, cfg, key=jax.random.key(0))
    return eqx.partition(skeleton, lambda x: isinstance(x, jax.ShapeDtypeStruct))


def _expanded(cfg: Config, family: str) -> Config:
    """GPT-2 files always hold every bias; the others are as the config says."""
    return cfg.replace(qkv_bias=True, o_bias=True, mlp_bias=True) if family == "gpt2" else cfg


# --------------------------------------------------------------------------- reading a folder
class _Weights:
    """The safetensors of a Hugging Face folder (one file, or shards with their index): shapes
    without reading data, tensors as numpy arrays on demand."""

    def __init__(self, folder: Path):
        self._folder = folder
        if (folder / INDEX).is_file():
            try:
                weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise HFFormatError(f"{INDEX}: unreadable (it must hold a weight_map)") from None
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise HFFormatError(f"{INDEX}: shard {missing[0]!r} is missing from {str(folder)!r} "
                                    f"({len(missing)} of {len(set(weight_map.values()))} missing); "
                                    "download every shard")
            self.files = dict(weight_map)
        elif (folder / WEIGHTS).is_file():
            with self._open(WEIGHTS) as f:
                self.files = dict.fromkeys(f.keys(), WEIGHTS)
        elif any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
            raise HFFormatError(f"{WEIGHTS}: {str(folder)!r} has only PyTorch pickle weights; only safetensors "
                                "import (transformers: model.save_pretrained(dir, safe_serialization=True))")
        else:
            raise HFFormatError(f"{WEIGHTS}: {str(folder)!r} has no {WEIGHTS} or {INDEX}")
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(self.files.values())):
            with self._open(file) as f:
                present = set(f.keys())
                for name in (n for n, fn in self.files.items() if fn == file):
                    if name not in present:
                        raise HFFormatError(f"{INDEX}: tensor {name!r} is not in its shard {file!r}")
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())

    def _open(self, file: str) -> Any:
        """safe_open of one file; HFFormatError naming it when it is not a safetensors file."""
        from safetensors import SafetensorError, safe_open  # noqa: PLC0415 (only these paths need it)

        try:
            return safe_open(str(self._folder / file), framework="numpy")
        except (SafetensorError, OSError) as e:
            raise HFFormatError(f"{file}: not a readable safetensors file: {e}") from None

    def get(self, name: str) -> np.ndarray:
        with self._open(self.files[name]) as f:
            return f.get_tensor(name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HFFormatError(f"{path.name}: unreadable JSON in {str(path.parent)!r}: {e}") from None
    if not isinstance(data, dict):
        raise HFFormatError(f"{path.name}: must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _folder_special_tokens(folder: Path, hf: dict[str, Any], tok: Tokenizer) -> dict[str, str]:
    """{role: token} from tokenizer_config.json / special_tokens_map.json, else config.json's
    *_token_id; only tokens the tokenizer has."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            data = _read_json(folder / name)
            for role in ROLES:
                found.setdefault(role, _token_text(data.get(role)))
    for role in ROLES:
        token_id = hf.get(f"{role}_id")
        if found.get(role) is None and isinstance(token_id, int):
            found[role] = tok.id_to_token(token_id)
    return {role: t for role, t in found.items() if t is not None and tok.token_to_id(t) is not None}


def _check_folder(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise FileNotFoundError(f"HF_DIR: {str(folder)!r} is not a directory")
    if not (folder / CONFIG_JSON).is_file():
        raise HFFormatError(f"{CONFIG_JSON}: {str(folder)!r} has none; pass a Hugging Face model folder "
                            "(config.json, model.safetensors, tokenizer.json)")
    return _read_json(folder / CONFIG_JSON)


def _load(folder: str | os.PathLike, dtype: Any, max_context: int | None
          ) -> tuple[Transformer, Config, Tokenizer, dict[str, Any]]:
    """Check everything, then read: (model with numpy arrays, config, tokenizer, hf_import.json)."""
    folder = Path(folder)
    hf = _check_folder(folder)
    cfg, family = config_from_hf(hf, max_context=max_context)
    if not (folder / TOKENIZER).is_file():
        raise HFFormatError(f"{TOKENIZER}: {str(folder)!r} has none; runs need a fast tokenizer "
                            "(transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir) writes it)")
    try:
        tok = load_tokenizer(folder / TOKENIZER)
    except TokenizerError as e:
        raise HFFormatError(f"{TOKENIZER}: {e}") from None
    if tok.get_vocab_size() > cfg.vocab_size:
        raise HFFormatError(f"{TOKENIZER}: {tok.get_vocab_size()} tokens, more than config.json's "
                            f"vocab_size={cfg.vocab_size}")
    dtype = parse_dtype(dtype or "float32")
    cfg = cfg.replace(tokenizer_type="char" if isinstance(tok.model, models.WordLevel) else "bpe",
                      use_bf16=dtype == jnp.bfloat16)
    weights = _Weights(folder)
    full = _expanded(cfg, family)
    ours_like = checkpoint.flatten(_shapes(full)[0])
    parts = _parts(full, family)
    n_experts = full.n_experts if full.use_moe else 0
    expected = jax.eval_shape(lambda p: _hf_tensors(p, parts, full.num_blocks, n_experts), ours_like)
    aliases = _aliases(weights.shapes, expected)
    for name, want in expected.items():
        got = weights.shapes.get(aliases.get(name, name))
        if got is None:
            raise HFFormatError(f"{WEIGHTS}: tensor {name!r} is missing; config.json describes a {family} model "
                                "that has it")
        if got != want.shape:
            raise HFFormatError(f"{WEIGHTS}: tensor {name!r} has shape {got}, config.json implies {want.shape}")
    used = {aliases.get(n, n) for n in expected}
    extra = sorted(n for n in weights.shapes if n not in used and not n.endswith(BUFFER_SUFFIXES)
                   and not (n == "lm_head.weight" and cfg.weight_tying))
    if extra:
        raise HFFormatError(f"{WEIGHTS}: tensor {extra[0]!r} has no place in the {family} model config.json "
                            f"describes ({len(extra)} such); check attention_bias / mlp_bias / tie_word_embeddings")
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == jnp.bfloat16 else np.dtype(np.float32)
    ours = _our_arrays(lambda n: weights.get(aliases.get(n, n)).astype(np_dtype), parts, full.num_blocks, n_experts)
    if family == "gpt2":  # keep only the biases that are not all zero (an export of ours has none)
        flags = {"qkv_bias": ["blocks.attn.qkv_bias"], "o_bias": ["blocks.attn.o_bias"],
                 "mlp_bias": ["blocks.mlp.up_bias", "blocks.mlp.down_bias"]}
        keep = {flag: any(np.any(ours[n] != 0) for n in names) for flag, names in flags.items()}
        for flag, names in flags.items():
            for n in names if not keep[flag] else []:
                del ours[n]
        cfg = cfg.replace(**keep)
    like, static = _shapes(cfg)
    model = eqx.combine(checkpoint.unflatten(ours, like), static)
    record = {"source": str(folder.resolve()), "model_type": family,
              "special_tokens": _folder_special_tokens(folder, hf, tok)}
    return model, cfg, tok, record


def _aliases(present: dict[str, Any], expected: dict[str, Any]) -> dict[str, str]:
    """Our expected name -> the file's name, for files that spell names differently: GPT-2
    checkpoints saved without the `transformer.` prefix (e.g. the original gpt2)."""
    out = {}
    for name in expected:
        if name not in present and name.startswith("transformer.") and name[len("transformer."):] in present:
            out[name] = name[len("transformer."):]
    return out


def from_hf(path: str | os.PathLike, *, dtype: Any = "float32", max_context: int | None = None) -> HFModel:
    """The model of a local Hugging Face folder (config.json, model.safetensors or shards with
    model.safetensors.index.json, tokenizer.json): (model, config, tokenizer).

    dtype "float32" (default; exact for bfloat16 files) or "bfloat16" (config.use_bf16 set).
    max_context: see `config_from_hf`. HFFormatError (a ConfigError) names the file or field
    of anything that does not fit: unsupported model_type, RoPE scaling, tensor shapes that
    disagree with config.json, a missing shard, tensors left over.
    """
    model, cfg, tok, _ = _load(path, dtype, max_context)
    return HFModel(jax.tree.map(jnp.asarray, model), cfg, tok)


def _check_new(out: Path, field: str) -> None:
    """FileExistsError naming `field` unless `out` is absent or an empty directory."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{field}: {str(out)!r} exists and is not empty; nothing is overwritten, "
                              "choose a new directory")


@contextmanager
def _new_dir(out: Path, field: str) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` when the block succeeds (removed
    when it fails): nothing half-written. FileExistsError naming `field` when `out` is taken."""
    _check_new(out, field)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def import_hf(path: str | os.PathLike, run_dir: str | os.PathLike, *, dtype: Any = "float32",
              max_context: int | None = None) -> Path:
    """Write the run directory `run_dir` (module docstring) from the Hugging Face folder `path`;
    every check of `from_hf` runs before anything is written. Returns its path."""
    run_dir = Path(run_dir)
    _check_new(run_dir, "RUN_DIR")
    model, cfg, tok, record = _load(path, dtype, max_context)
    params = eqx.filter(model, eqx.is_array)
    with _new_dir(run_dir, "RUN_DIR") as tmp:
        cfg.to_yaml(tmp / "config.yaml")
        save_tokenizer(tok, tmp / TOKENIZER, source=Path(path) / TOKENIZER)
        checkpoint.save(tmp, checkpoint.BEST, 0, params)
        checkpoint.save(tmp, checkpoint.LATEST, 0, params)
        atomic_write_text(tmp / IMPORT_FILE, json.dumps(record, indent=2) + "\n")
    return run_dir


# --------------------------------------------------------------------------- export
def _guess_special_tokens(tok: Tokenizer) -> dict[str, str]:
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    found = {}
    for role, names in ROLE_GUESSES.items():
        hit = next((n for n in names if n in specials), None)
        if hit is not None:
            found[role] = hit
    return found


def _run_special_tokens(run_dir: Path, tok: Tokenizer) -> dict[str, str]:
    """The special tokens recorded by an import in `run_dir` or in the run it was fine-tuned
    from (its init_from chain), else guessed by name from the tokenizer's special tokens."""
    from .pretrained import load_config  # noqa: PLC0415

    seen: set[Path] = set()
    path: Path | None = run_dir
    while path is not None and path not in seen and (path / "config.yaml").is_file():
        seen.add(path)
        if (path / IMPORT_FILE).is_file():
            recorded = _read_json(path / IMPORT_FILE).get("special_tokens") or {}
            return {r: t for r, t in recorded.items() if r in ROLES and tok.token_to_id(t) is not None}
        init_from = load_config(path).init_from
        path = Path(init_from).resolve() if init_from else None
    return _guess_special_tokens(tok)


def _tokenizer_config(special: dict[str, str], max_context: int) -> dict[str, Any]:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_context,
            "clean_up_tokenization_spaces": False, **special}


def to_hf(model: Any, config: Config, tokenizer: Tokenizer, out_dir: str | os.PathLike, *, dtype: Any = None,
          special_tokens: dict[str, str] | None = None, tokenizer_file: str | os.PathLike | None = None) -> Path:
    """Write the Hugging Face folder `out_dir` (module docstring) for `model` under `config`.

    LoRA adapters are merged; dtype "float32" | "bfloat16" | None (as the weights are).
    special_tokens: {"eos_token": "</s>", ...}, None = guessed from the tokenizer's special
    tokens. tokenizer_file: the file `tokenizer` was read from, copied byte for byte when it
    still describes it. HFFormatError naming the field when Hugging Face cannot express the
    model; FileExistsError when `out_dir` exists and is not empty. Nothing half-written.
    """
    from safetensors.numpy import save_file  # noqa: PLC0415

    out = Path(out_dir)
    _check_new(out, "out_dir")
    plain = plain_model(model, dtype)
    cfg = config.replace(use_lora=False, init_from="", vocab_size=plain.vocab_size)
    family = hf_model_type(cfg)
    full = _expanded(cfg, family)
    ours = {k: np.asarray(jax.device_get(v)) for k, v in checkpoint.flatten(eqx.filter(plain, eqx.is_array)).items()}
    weight_dtype = ours["embedding"].dtype
    if full != cfg:  # GPT-2 biases the run does not have: zeros
        shapes = checkpoint.flatten(_shapes(full)[0])
        ours |= {n: np.zeros(s.shape, weight_dtype) for n, s in shapes.items() if n not in ours}
    tensors = _hf_tensors(ours, _parts(full, family), cfg.num_blocks, cfg.n_experts if cfg.use_moe else 0)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    special = _guess_special_tokens(tokenizer) if special_tokens is None else dict(special_tokens)
    ids = {role: tokenizer.token_to_id(t) for role, t in special.items()}
    dtype_name = "bfloat16" if weight_dtype == np.dtype(ml_dtypes.bfloat16) else str(weight_dtype)
    hf = hf_config(cfg, ids, dtype_name)
    generation = {k: v for k, v in hf.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with _new_dir(out, "out_dir") as tmp:
        atomic_write_text(tmp / CONFIG_JSON, json.dumps(hf, indent=2) + "\n")
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})  # transformers needs format "pt"
        save_tokenizer(tokenizer, tmp / TOKENIZER, source=tokenizer_file)
        atomic_write_text(tmp / "tokenizer_config.json",
                          json.dumps(_tokenizer_config(special, cfg.max_context), indent=2) + "\n")
    return out


def export_hf(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: Any = None) -> Path:
    """`to_hf` for a run directory (best checkpoint; a LoRA run merged): refuses a config that
    Hugging Face cannot express, or a taken `out_dir`, before loading any weights."""
    from .pretrained import from_pretrained, load_config  # noqa: PLC0415

    run_dir, out = Path(run_dir), Path(out_dir)
    _check_new(out, "out_dir")
    config = load_config(run_dir)
    hf_model_type(config)
    tokenizer = load_tokenizer(run_dir / TOKENIZER)
    model = from_pretrained(run_dir, merge_lora=True)
    return to_hf(model, config, tokenizer, out, dtype=dtype, special_tokens=_run_special_tokens(run_dir, tokenizer),
                 tokenizer_file=run_dir / TOKENIZER)

