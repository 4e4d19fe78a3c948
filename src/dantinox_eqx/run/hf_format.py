"""The Hugging Face format as data: families, tensor names and layouts, config.json <-> Config.

`run/hf.py` reads and writes folders with it; the layouts are drawn in its module docstring and
in docs/guides/models.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import numpy as np
from tokenizers import Tokenizer

from ..config import Config, ConfigError
from ..model import Transformer, rope_base

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


def parts_of(cfg: Config, family: str) -> list[Part]:
    return _gpt2_parts(cfg) if family == "gpt2" else _llama_parts(cfg)


def _piece(x: Any, part: Part) -> Any:
    """Our array (one block / expert) -> the Hugging Face tensor. Array methods only, so it runs
    on numpy arrays (export) and under `jax.eval_shape` (the expected shapes of an import)."""
    if part.cols is not None:
        x = x[..., part.cols[0]:part.cols[1]]
    return x.T if part.linear else x


def hf_tensors(ours: dict[str, Any], parts: list[Part], n_blocks: int, n_experts: int) -> dict[str, Any]:
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


def our_arrays(get: Callable[[str], np.ndarray], parts: list[Part], n_blocks: int, n_experts: int
                ) -> dict[str, np.ndarray]:
    """The inverse of `hf_tensors`: our flat arrays from `get(Hugging Face name)`."""
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
    # The block options of issue 16 that no exported family computes (zero_init_proj is only
    # an initialisation: the trained weights export as any others).
    if cfg.qk_norm:
        _refuse("qk_norm", "RMSNorm on each head's queries and keys")
    if cfg.logit_softcap is not None:
        _refuse("logit_softcap", "a tanh soft-cap on the logits")
    if cfg.activation == "relu2" and not cfg.use_swiglu:
        _refuse("activation", "the ReLU-squared MLP")
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
    (shorter training windows and KV caches) for RoPE models; GPT-2's position table of
    n_positions rows serves at most that many (the config keeps n_positions: the importer
    slices the table to its first `max_context` rows after reading it)."""
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
        if max_context is not None and max_context > C:
            raise HFFormatError(f"max_context: a gpt2 model's learned position table has n_positions={C} rows; "
                                f"max_context={max_context} cannot exceed it (use max_context <= {C})")
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


def shapes_of(cfg: Config) -> tuple[Any, Any]:
    """(the arrays of `Transformer(cfg)` as ShapeDtypeStructs, the rest): nothing computed."""
    skeleton = eqx.filter_eval_shape(Transformer, cfg, key=jax.random.key(0))
    return eqx.partition(skeleton, lambda x: isinstance(x, jax.ShapeDtypeStruct))


def expanded_config(cfg: Config, family: str) -> Config:
    """GPT-2 files always hold every bias; the others are as the config says."""
    return cfg.replace(qkv_bias=True, o_bias=True, mlp_bias=True) if family == "gpt2" else cfg
