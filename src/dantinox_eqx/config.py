"""One frozen, flat `Config` for every part of dantinox-eqx.

Field names and defaults are the original DantinoX ones (its users have these YAML files on
disk), plus a few of ours, marked "ours". Files load flat or in DantinoX's sectioned layout
(`model:`, `training:`, ... sections that are flattened on load).

A `Config` is immutable: build a changed copy with `config.replace(field=value)`. Every
field is checked at construction and a bad one raises `ConfigError` naming the field.
"""

import dataclasses
import difflib
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .files import atomic_write_text

__all__ = ["Config", "ConfigError", "SECTIONS", "IGNORED_FIELDS", "MODEL_SHAPE_FIELDS", "closest", "as_number"]


class ConfigError(ValueError):
    """A config field is unknown, mistyped or inconsistent. The message names the field."""


class ImmutableConfigError(ConfigError, dataclasses.FrozenInstanceError):
    """Raised by `config.field = value`: configs are immutable, use `config.replace`."""


SCHEDULES = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "adafactor", "lion", "adam", "muon")  # issue 16: adam, muon
TOKENIZERS = ("char", "bpe")
TRAIN_ON = ("assistant", "all")  # issue 23: data/chat_data.TRAIN_ON
UNKNOWN_CHARS = ("error", "drop")  # issue 14: tokenizer.UNKNOWN_CHARS (config imports nothing of ours)
DATASET_SOURCES = ("local", "hf")  # issue 14: DantinoX's dataset_source values
LORA_TARGETS = ("attention", "mlp", "all")
SHARDINGS = ("dp", "fsdp")
REMATS = ("none", "dots", "full")
ATTENTION_IMPLS = ("auto", "fused", "plain")
ACTIVATIONS = ("gelu", "relu", "silu", "relu2")  # issue 16: relu2 = relu(x)^2
NORMS = ("rmsnorm", "layernorm")
MUON_PARAMS = ("blocks", "attention", "mlp")  # issue 16: which block matrices Muon trains
AUTO_UNROLL_MAX_BLOCKS = 6  # scan_unroll 0 (auto) unrolls every layer up to this depth
DEFAULT_ROPE_THETA = 10000.0  # the RoPE base when rope_theta is null

# Sections of DantinoX's YAML layout. Loading flattens them; a field may appear in one only.
SECTIONS = ("model", "moe", "mla", "attention", "tokenizer", "data", "training", "lora",
            "logging", "devices", "optimizer")

# Fields of DantinoX 0.4.14 outside our scope (its diffusion and flow-matching paradigms,
# differential / linear / flash attention switches, latent MoE, tensor parallelism). Its config
# files must still load: we warn that they are ignored.
IGNORED_FIELDS = frozenset({
    "model_type", "attention_type", "diffusion_steps", "noise_schedule", "mask_token_id",
    "num_sampling_steps", "time_emb_dim", "embed_dim", "bottleneck_dim", "num_time_tokens",
    "num_cfg_tokens", "num_mode_tokens", "denoiser_pmean", "denoiser_pstd", "denoiser_noise_scale",
    "decoder_pmean", "decoder_pstd", "decoder_noise_scale", "denoiser_prob", "self_cond_prob",
    "cfg_scale_min", "cfg_scale_max", "flow_cfg_scale", "flow_n_steps", "sde_gamma", "t5_model_name",
    "moe_latent", "moe_latent_dim", "differential", "lambda_init", "use_flash_attention",
    "use_linear_attention", "tp_size",
})

# Fields that fix the shapes of the parameters: a resumed run or a fine-tune must keep them.
# Not max_context (issue 22): no weight of a RoPE model depends on it, and a learned position
# table serves a shorter window with its first rows (model.with_max_context; the fine-tune and
# resume checks treat it on its own).
MODEL_SHAPE_FIELDS = (
    "dim", "n_heads", "head_size", "num_blocks", "vocab_size", "kv_heads", "weight_tying",
    "use_swiglu", "expansion", "use_moe", "n_experts", "shared_expert", "mla", "down_dim_q",
    "down_dim_kv", "rope_dim", "absolute_pos", "trainable_pos", "norm_type",
    "tokenizer_type", "mlp_hidden", "qkv_bias", "o_bias", "mlp_bias", "qk_norm",
)


# no_type_check: our own validation (ConfigError naming the field) must run, not the test
# suite's generic runtime type checker, which would otherwise wrap __init__.
@typing.no_type_check
@dataclass(frozen=True)
class Config:
    """Every setting of a run. Immutable; see the module docstring."""

    # --- model -----------------------------------------------------------------------------
    dim: int = 512  # residual width; must equal n_heads * head_size
    n_heads: int = 16
    head_size: int = 32
    num_blocks: int = 12
    vocab_size: int | None = None  # None: taken from the tokenizer when training starts
    max_context: int = 512  # training sequence length, and the KV-cache size when sampling
    kv_heads: int | None = None  # None = n_heads; fewer = grouped-query attention (GQA)
    weight_tying: bool = True  # the output head reuses the token embedding
    activation: str = "gelu"  # MLP non-linearity when use_swiglu is false
    use_swiglu: bool = True  # gated SiLU MLP (LLaMA); the width is still expansion * dim
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-6  # ours: epsilon inside every RMSNorm / LayerNorm (HF Llama uses 1e-5)
    qkv_bias: bool = False  # ours: a bias on the query, key and value projections (Qwen2, GPT-2)
    o_bias: bool = False  # ours: a bias on the attention output projection (GPT-2)
    mlp_bias: bool = False  # ours: biases on the dense MLP's projections (GPT-2)
    dropout_rate: float = 0.0
    # ours (issue 16), all off by default: modded-nanogpt's block options
    qk_norm: bool = False  # RMSNorm (learned scale per head dim) on queries and keys, before RoPE
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap); None = off
    zero_init_proj: bool = False  # attention and MLP output projections start at zero
    gradient_checkpointing: bool = False  # DantinoX's name for remat: "full"
    # --- positions / attention -------------------------------------------------------------
    use_rotary_pos: bool = True
    trainable_pos: bool = False  # a learned absolute position table (with absolute_pos)
    absolute_pos: bool = False  # add absolute position embeddings (sinusoidal unless trainable)
    rope_scale_factor: float = 1.0  # NTK-aware RoPE base scaling; > 1 to sample past max_context
    rope_theta: float | None = None  # ours: the RoPE base before that scaling; None = 10000
    sliding_window: bool = False  # attend only to the last context_window tokens
    context_window: int = 4
    no_sink: bool = False  # with sliding_window: do not keep token 0 visible as attention sink
    # --- mixture of experts ----------------------------------------------------------------
    use_moe: bool = False
    n_experts: int = 4
    top_k_mlp: int = 2
    expansion: int = 4  # MLP hidden width = expansion * dim (per expert for MoE)
    mlp_hidden: int | None = None  # ours: the MLP hidden width itself (wins over expansion); None = expansion * dim
    alpha_balance: float = 0.1  # weight of the load-balancing loss added to the LM loss
    shared_expert: bool = False  # ours: one always-on expert beside the routed ones
    capacity_factor: float = 0.0  # ours: 0 = dropless; > 0 caps tokens per expert
    # --- multi-head latent attention -------------------------------------------------------
    mla: bool = False
    inference: bool = False  # MLA: absorbed (cached-latent) form instead of the naive one
    down_dim_q: int = 256
    down_dim_kv: int = 256
    rope_dim: int = 32
    # --- data / tokenizer ------------------------------------------------------------------
    tokenizer_type: str = "char"
    tokenizer_path: str | None = None  # a tokenizer.json to reuse instead of training one
    bpe_vocab_size: int = 2048  # ours: target vocabulary of a trained BPE tokenizer
    init_from: str = ""  # a run directory whose weights initialise this run (fine-tuning)
    chat_template: str | None = None  # ours: a Jinja chat template file for the run; None = init_from's, if any
    max_train_tokens: int = 10_000_000
    val_fraction: float = 0.1  # ours: the tail of the corpus held out for validation
    # ours (issue 14): a separate validation set, a text file or a prepared dataset directory;
    # when set, val_fraction is unused and all of data_path trains
    val_path: str | None = None
    unknown_chars: str = "error"  # ours: text outside a char vocabulary (fine-tune, eval): error or drop
    # ours (issue 23): chat fine-tuning data and packed windows
    train_on: str = "assistant"  # chat data: the loss covers the assistant turns (+ end-of-turn), or "all"
    chat_template: str | None = None  # a Jinja chat template file, for chat data of a run without one
    document_mask: bool = False  # plain text: attention and positions restart after each end-of-text token
    # --- Hugging Face datasets (DantinoX's fields; issue 14: `prepare` reads them) ----------
    dataset_source: str = "local"  # "local": a file/folder/glob path; "hf": the dataset below
    dataset_name: str = ""  # hub id, a local dataset folder, or a save_to_disk directory
    dataset_config: str = ""  # the dataset's configuration (subset) name; "" = its default
    dataset_split: str = "train"
    dataset_text_field: str = "text"  # the text field of HF, JSONL and Parquet sources
    streaming: bool = False  # read the HF dataset as a stream instead of downloading it first
    # --- training --------------------------------------------------------------------------
    lr: float = 3e-4
    batch_size: int = 32  # sequences per micro-batch; a step sees batch_size * grad_accum
    grad_accum: int = 1
    seed: int = 42
    optimizer: str = "adamw"
    epochs: float = 100  # passes over the training tokens; max_steps wins when set
    max_steps: int | None = None  # ours
    warmup_steps: int = 400
    grad_clip: float = 1.0  # global-norm clipping; 0 disables it
    patience: int = 0  # evaluations without val improvement before stopping; 0 = never
    use_bf16: bool = False
    master_weights: bool = False  # ours: with use_bf16, keep float32 master params
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.01  # ours: decaying schedules end at lr * min_lr_ratio
    wsd_stable_fraction: float = 0.4  # ours: share of post-warmup steps held at peak in wsd
    weight_decay: float = 0.1  # ours: decoupled, on matrices only (not norms/embeddings)
    beta1: float = 0.9  # ours
    beta2: float = 0.95  # ours
    # ours (issue 16): optimizer muon = Muon on the blocks' matrices, AdamW (lr) on the rest
    muon_lr: float = 0.01  # Muon group's peak lr (lr_schedule's shape); best of 0.01-0.08 on the baby shape
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    muon_weight_decay: float = 0.0  # Muon group's decoupled decay, multiplied by its lr
    muon_params: str = "blocks"  # the block matrices Muon trains: blocks | attention | mlp
    eval_interval: int = 50  # ours: the seed evaluates every 50 steps
    checkpoint_interval: int | None = None  # ours: None = eval_interval
    keep_checkpoints: int = 2  # ours: latest checkpoints kept (resume falls back if the newest is bad)
    eval_iters: int = 20
    # --- LoRA ------------------------------------------------------------------------------
    use_lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "attention"
    # --- devices / performance -------------------------------------------------------------
    n_devices: int = 0  # 0 = every visible device
    sharding: str = "dp"  # ours: "dp" replicates params, "fsdp" shards them over devices
    remat: str = "none"  # ours: rematerialisation of each block: none | dots | full
    # ours: training attention: fused = jax.nn.dot_product_attention (cuDNN flash attention on
    # GPUs), plain = einsums + softmax; auto = fused on GPU in bfloat16/float16, else plain
    attention_impl: str = "auto"
    scan_unroll: int = 0  # ours: layers per lax.scan iteration; 0 = auto (see effective_scan_unroll)
    # ours: tokens per chunk of the chunked cross-entropy (nn/cross_entropy.py): the (tokens, vocab)
    # logits are never whole in training or evaluation. 0 = auto (chunks of 1024 when the float32
    # logits would exceed 64 MiB, e.g. a 49k vocabulary from ~340 tokens), -1 = never, n = n tokens
    loss_chunk: int = 0
    # --- logging ---------------------------------------------------------------------------
    log_file: str = "training_log.csv"
    summary_file: str = "model_summary.json"
    wandb: bool = False  # ours
    wandb_project: str | None = None  # ours; setting it turns wandb on

    # ---------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for f in fields(self):
            value = _check_type(f.name, getattr(self, f.name), _hints()[f.name])
            object.__setattr__(self, f.name, value)
        _validate(self)

    # dataclass(frozen=True) generates __setattr__; we replace it below with a clearer error.

    @property
    def effective_kv_heads(self) -> int:
        return self.n_heads if self.kv_heads is None else self.kv_heads

    @property
    def effective_rope_theta(self) -> float:
        """The RoPE base before rope_scale_factor's NTK scaling: rope_theta, or 10000 when null."""
        return DEFAULT_ROPE_THETA if self.rope_theta is None else self.rope_theta

    @property
    def mlp_width(self) -> int:
        """The MLP hidden width F (per expert for MoE): mlp_hidden, or expansion * dim when null."""
        return self.expansion * self.dim if self.mlp_hidden is None else self.mlp_hidden

    @property
    def effective_remat(self) -> str:
        return "full" if self.gradient_checkpointing and self.remat == "none" else self.remat

    @property
    def effective_scan_unroll(self) -> int:
        """`scan_unroll`, or for 0 (auto) every layer up to AUTO_UNROLL_MAX_BLOCKS blocks and 1
        (a rolled loop, compile time flat in depth) above, and always 1 with FSDP (the loop is
        what keeps one gathered layer live at a time). On XLA:CPU the rolled loop costs copies
        of the carried stacks each iteration: 4 blocks, baby shape, 62 -> 37 ms/step unrolled;
        compile time grows ~0.1 s per unrolled block (1.4 s at 2, 2.2 s at 8), so auto stops
        at 6 blocks to keep compile time flat in depth (1.4-1.8 s at 2/8/16 blocks). Deeper
        models trade compile for speed with an explicit value (8 blocks: 121 -> 100 ms/step
        with scan_unroll 8)."""
        if self.scan_unroll:
            return self.scan_unroll
        if self.sharding == "fsdp" or self.num_blocks > AUTO_UNROLL_MAX_BLOCKS:
            return 1
        return self.num_blocks

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.max_context

    def total_steps(self, n_train_tokens: int) -> int:
        """Optimizer steps of the run: `max_steps`, else `epochs` passes over the train tokens."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * n_train_tokens / self.tokens_per_step))

    def replace(self, **overrides: Any) -> "Config":
        """A copy with `overrides` applied (and validated). Unknown names raise ConfigError."""
        _check_names(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        """Build from a flat or sectioned mapping (see `flatten`)."""
        return cls(**flatten(data))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "Config":
        """Load a flat or sectioned YAML config (safe_load; ConfigError naming the problem).
        An empty file (or one of comments only) is refused: it would silently train the
        dataclass defaults, which are not the packaged default config."""
        data = read_yaml_mapping(path, "config file", "an existing YAML file", "a mapping of field: value")
        if not data:
            raise ConfigError(f"config file {str(path)!r} is empty (no field is set); write the fields to "
                              "change into it, or leave --config out for the packaged default config")
        return cls.from_dict(data)

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """The flat YAML text of every field; written atomically to `path` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write_text(Path(path), text)
        return text

    @staticmethod
    def coerce(name: str, text: str) -> Any:
        """Parse a command-line string for field `name` (`"True"`, `"3e-4"`, `"None"`, ...)."""
        _check_names({name: None})
        hint = _hints()[name]
        base, optional = _unwrap_optional(hint)
        if optional and text.strip().lower() in ("none", "null", ""):
            return None
        if base is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"{name}: expected true or false, got {text!r}")
        if base is int:
            try:
                return int(text)
            except ValueError:
                try:
                    as_float = float(text)
                except ValueError:
                    as_float = math.nan
                if as_float.is_integer():
                    return int(as_float)
                raise ConfigError(f"{name}: expected an integer, got {text!r}") from None
        if base is float:
            try:
                return float(text)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got {text!r}") from None
        return text


def _immutable_setattr(self: Config, name: str, value: Any) -> None:
    raise ImmutableConfigError(
        f"Config is immutable: cannot set {name!r}; use config = config.replace({name}={value!r})"
    )


_dataclass_init = Config.__init__


def _checked_init(self: Config, *args: Any, **kwargs: Any) -> None:
    _check_names(kwargs)  # an unknown keyword gets a did-you-mean, not a bare TypeError
    _dataclass_init(self, *args, **kwargs)


Config.__setattr__ = _immutable_setattr  # type: ignore[method-assign]
Config.__init__ = _checked_init  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------------
_HINTS: dict[str, Any] | None = None


def _hints() -> dict[str, Any]:
    global _HINTS
    if _HINTS is None:
        _HINTS = {f.name: f.type for f in fields(Config)}  # real types: no __future__ annotations here
    return _HINTS


def _field_names() -> list[str]:
    return [f.name for f in fields(Config)]


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def closest(word: Any, options: Any) -> str | None:
    """The option most like `word` (for a "did you mean" hint), or None when none is close."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return close[0] if close else None


def as_number(value: Any) -> int | float | None:
    """`value` as a number (an int stays an int), or None when it is not one. A string is
    parsed as a float: YAML 1.1 reads "3e-4" (no dot) as a string. Booleans are not numbers."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_type(name: str, value: Any, hint: Any) -> Any:
    base, optional = _unwrap_optional(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: must not be null (expected {base.__name__})")
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        number = as_number(value)
        if number is not None:
            return float(number)
    elif base is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{name}: expected {base.__name__}, got {type(value).__name__} {value!r}")


def _check_names(data: dict[str, Any]) -> None:
    names = _field_names()
    for key in data:
        if key not in names:
            close = closest(key, names)
            hint = f"; did you mean {close!r}?" if close else "; see Config's fields"
            raise ConfigError(f"unknown config field {key!r}{hint}")


def flatten(data: dict[str, Any]) -> dict[str, Any]:
    """Flatten DantinoX's sectioned layout into one mapping; drop out-of-scope fields (warned).

    A top-level key whose value is a mapping is a section (`SECTIONS` lists DantinoX's). A field defined in two
    sections, or both in a section and at top level, raises ConfigError.
    """
    flat: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in data.items():
        # Like DantinoX, any mapping-valued top-level key is a section (no field holds a mapping).
        section = isinstance(value, dict)
        items = value.items() if section else [(key, value)]
        where = f"section {key!r}" if section else "top level"
        for name, v in items:
            if name in flat:
                raise ConfigError(f"{name}: set twice (in {origin[name]} and in {where}); keep one")
            flat[name], origin[name] = v, where
    ignored = sorted(k for k in flat if k in IGNORED_FIELDS)
    if ignored:
        warnings.warn(f"config fields outside dantinox-eqx's scope are ignored: {', '.join(ignored)}",
                      stacklevel=3)
    flat = {k: v for k, v in flat.items() if k not in IGNORED_FIELDS}
    _check_names(flat)
    return flat


def _positive(cfg: Config, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{name}: must be positive, got {value}")


def _non_negative(cfg: Config, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise ConfigError(f"{name}: must be >= 0, got {value}")


def _choice(cfg: Config, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        close = closest(value, allowed)
        hint = f" (did you mean {close!r}?)" if close else ""
        raise ConfigError(f"{name}: unknown value {value!r}{hint}; choose one of {', '.join(allowed)}")


def _validate(cfg: Config) -> None:
    _positive(cfg, "dim", "n_heads", "head_size", "num_blocks", "vocab_size", "max_context",
              "kv_heads", "context_window", "n_experts", "top_k_mlp", "expansion", "down_dim_q",
              "down_dim_kv", "rope_dim", "bpe_vocab_size", "max_train_tokens", "lr", "batch_size",
              "grad_accum", "epochs", "max_steps", "eval_interval", "checkpoint_interval",
              "keep_checkpoints", "eval_iters", "lora_rank", "lora_alpha", "rope_scale_factor", "norm_eps",
              "rope_theta", "mlp_hidden", "muon_lr", "logit_softcap")
    _non_negative(cfg, "warmup_steps", "grad_clip", "patience", "weight_decay", "n_devices",
                  "alpha_balance", "capacity_factor", "min_lr_ratio", "scan_unroll", "muon_weight_decay")
    if cfg.loss_chunk < -1:
        raise ConfigError(f"loss_chunk: must be -1 (never chunk), 0 (auto) or a positive token count, "
                          f"got {cfg.loss_chunk}")
    for name in ("dropout_rate", "lora_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{name}: must be in [0, 1), got {getattr(cfg, name)}")
    for name in ("val_fraction", "wsd_stable_fraction", "beta1", "beta2", "muon_momentum"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{name}: must be in [0, 1), got {getattr(cfg, name)}")
    _choice(cfg, "lr_schedule", SCHEDULES)
    _choice(cfg, "optimizer", OPTIMIZERS)
    _choice(cfg, "tokenizer_type", TOKENIZERS)
    _choice(cfg, "unknown_chars", UNKNOWN_CHARS)  # issue 14
    _choice(cfg, "train_on", TRAIN_ON)  # issue 23
    _choice(cfg, "dataset_source", DATASET_SOURCES)  # issue 14
    _choice(cfg, "lora_targets", LORA_TARGETS)
    _choice(cfg, "sharding", SHARDINGS)
    _choice(cfg, "remat", REMATS)
    _choice(cfg, "attention_impl", ATTENTION_IMPLS)
    _choice(cfg, "activation", ACTIVATIONS)
    _choice(cfg, "norm_type", NORMS)
    _validate_recipe(cfg)
    if cfg.dim != cfg.n_heads * cfg.head_size:
        raise ConfigError(
            f"dim: must equal n_heads * head_size = {cfg.n_heads} * {cfg.head_size} = "
            f"{cfg.n_heads * cfg.head_size}, got {cfg.dim}; change dim, n_heads or head_size"
        )
    if cfg.n_heads % cfg.effective_kv_heads:
        raise ConfigError(
            f"kv_heads: n_heads={cfg.n_heads} must be a multiple of kv_heads={cfg.kv_heads}; "
            f"pick kv_heads from the divisors of n_heads"
        )
    if cfg.use_moe and cfg.top_k_mlp > cfg.n_experts:
        raise ConfigError(f"top_k_mlp: {cfg.top_k_mlp} exceeds n_experts={cfg.n_experts}")
    for name in ("qkv_bias", "o_bias"):
        if cfg.mla and getattr(cfg, name):
            raise ConfigError(f"{name}: multi-head latent attention (mla) has no such projection bias; "
                              f"set {name}: false or mla: false")
    if cfg.use_moe and cfg.mlp_bias:
        raise ConfigError("mlp_bias: MoE experts have no biases; set mlp_bias: false or use_moe: false")
    if cfg.use_rotary_pos and cfg.head_size % 2:
        raise ConfigError(f"head_size: rotary positions need an even head_size, got {cfg.head_size}")
    if cfg.mla and cfg.rope_dim % 2:
        raise ConfigError(f"rope_dim: must be even for rotary positions, got {cfg.rope_dim}")
    if cfg.n_devices and cfg.batch_size % cfg.n_devices:
        raise ConfigError(
            f"batch_size: {cfg.batch_size} is not divisible by n_devices={cfg.n_devices}; "
            f"use a multiple of {cfg.n_devices}"
        )


def _validate_recipe(cfg: Config) -> None:
    """Issue 16's fields: Muon's parameter groups and the block options."""
    if cfg.muon_params not in MUON_PARAMS:
        if cfg.muon_params in ("embedding", "head", "norms", "all"):
            raise ConfigError(f"muon_params: Muon cannot train {cfg.muon_params!r}: it orthogonalises the "
                              "blocks' weight matrices; embeddings, the head and norms always stay on AdamW; "
                              f"choose one of {', '.join(MUON_PARAMS)}")
        _choice(cfg, "muon_params", MUON_PARAMS)
    if cfg.activation == "relu2" and cfg.use_swiglu:
        raise ConfigError("activation: 'relu2' is the non-gated MLP's non-linearity, but use_swiglu is true "
                          "(SwiGLU ignores activation); set use_swiglu: false")
    if cfg.qk_norm and cfg.mla:
        raise ConfigError("qk_norm: not available with mla (latent attention normalises its latents "
                          "already); set qk_norm: false or mla: false")


def read_yaml_mapping(path: str | os.PathLike, label: str, fix: str, holds: str) -> dict[str, Any]:
    """The mapping in the YAML file `path` ({} when empty), read with `yaml.safe_load` (no
    arbitrary objects). ConfigError "`label` 'path' ..." for a missing file ("pass `fix`"),
    invalid YAML, or a document that is not a mapping ("must hold `holds`")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{label} {str(path)!r} does not exist; pass {fix}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{label} {str(path)!r} is not valid YAML: {e}".replace("\n", " ")) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{label} {str(path)!r} must hold {holds}")
    return data
