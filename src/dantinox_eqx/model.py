"""The GPT: embedding -> scanned stack of pre-norm blocks -> norm -> head, built from a Config.

Read this file top to bottom for the model; its layers live in `nn/` and take plain sizes
(`Attention`, `MLAttention`, `MLP`, `MoE`, `Norm`, `Linear`); here a `Config` picks and sizes them.

Shapes: B batch, T new tokens, D = dim, V vocab.

The blocks are stacked (every array has a leading `num_blocks` axis) and run with `lax.scan`,
so one block is traced whatever the depth. `scan_unroll` (config; default auto = every layer up
to 6 blocks) lets XLA unroll the loop: on XLA:CPU the rolled loop copies its carried stacks
every iteration (baby shape 62 -> 37 ms/step unrolled) for ~0.1 s more compile per block.
Block parts are swappable: the attention is `Attention` or `MLAttention`, the MLP is `MLP` or
`MoE`; every MLP returns `(y, balance_loss)` (0 for dense) and every attention `(y, cache)`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, Scalar

from .config import Config, ConfigError
from .nn.attention import Attention, KVCache, attend, causal_mask, segment_starts, write_cache
from .nn.cross_entropy import auto_chunk, chunked_cross_entropy
from .nn.functional import cast_floating, dropout, fold_key, split_key
from .nn.linear import Linear, matmul, normal_init
from .nn.mla import MLAttention
from .nn.mlp import MLP, gelu
from .nn.moe import MoE, find_modules
from .nn.norm import Norm
from .nn.rope import rope, rope_base, sinusoidal
from .parallel.sharding import GATHERED_NOT_SAVED, constrain_layer, layers_gathered

# The layers are re-exported: `from dantinox_eqx.model import Linear, attend, ...` keeps working.
__all__ = ["Transformer", "Block", "Attention", "MLP", "Linear", "Norm", "KVCache", "rope", "attend", "gelu",
           "matmul", "write_cache", "causal_mask", "dropout", "cast_floating", "residual_std", "segment_positions",
           "make_attention", "make_mlp", "param_counts", "expert_counts", "with_max_context", "unstack_blocks"]


def residual_std(cfg: Config) -> float:
    """Init std of the projections that write into the residual stream (attention out, MLP
    down): GPT-2's 0.02 / sqrt(2 L), so the stream's variance does not grow with depth; 0 with
    `zero_init_proj` (every block starts as the identity, modded-nanogpt's init)."""
    return 0.0 if cfg.zero_init_proj else 0.02 / math.sqrt(2 * cfg.num_blocks)


# --------------------------------------------------------------------------- block parts
def make_attention(cfg: Config, *, key: PRNGKeyArray) -> Attention | MLAttention:
    """The config's attention: grouped-query `Attention`, or `MLAttention` when `mla`."""
    window = cfg.context_window if cfg.sliding_window else None
    sink = cfg.sliding_window and not cfg.no_sink
    rope_dim = cfg.rope_dim if cfg.mla else cfg.head_size
    base = rope_base(rope_dim, cfg.rope_scale_factor, cfg.effective_rope_theta) if cfg.use_rotary_pos else None
    if cfg.mla:
        return MLAttention(cfg.dim, cfg.n_heads, cfg.head_size, cfg.rope_dim, cfg.down_dim_q, cfg.down_dim_kv,
                           key=key, norm_type=cfg.norm_type, norm_eps=cfg.norm_eps, rope_base=base, window=window,
                           sink=sink, dropout_rate=cfg.dropout_rate, absorbed=cfg.inference,
                           out_std=residual_std(cfg))
    return Attention(cfg.dim, cfg.n_heads, cfg.effective_kv_heads, cfg.head_size, key=key, rope_base=base,
                     window=window, sink=sink, dropout_rate=cfg.dropout_rate, impl=cfg.attention_impl,
                     out_std=residual_std(cfg), qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias, qk_norm=cfg.qk_norm)


def make_mlp(cfg: Config, *, key: PRNGKeyArray) -> MLP | MoE:
    """The config's MLP: dense `MLP` of width `mlp_width` (mlp_hidden, or expansion * dim), or
    `MoE` (that width per expert) when `use_moe`."""
    hidden = cfg.mlp_width
    if cfg.use_moe:
        return MoE(cfg.dim, hidden, cfg.n_experts, cfg.top_k_mlp, key=key, capacity_factor=cfg.capacity_factor,
                   shared_expert=cfg.shared_expert, swiglu=cfg.use_swiglu, activation=cfg.activation,
                   out_std=residual_std(cfg))
    return MLP(cfg.dim, hidden, key=key, swiglu=cfg.use_swiglu, activation=cfg.activation,
               out_std=residual_std(cfg), bias=cfg.mlp_bias)


# --------------------------------------------------------------------------- block
class Block(eqx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    attn_norm: Norm
    attn: eqx.Module
    mlp_norm: Norm
    mlp: eqx.Module
    dropout_rate: float = eqx.field(static=True)

    def __init__(self, cfg: Config, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.attn_norm = Norm(cfg.dim, cfg.norm_type, cfg.norm_eps)
        self.mlp_norm = Norm(cfg.dim, cfg.norm_type, cfg.norm_eps)
        self.attn, self.mlp = make_attention(cfg, key=k1), make_mlp(cfg, key=k2)
        self.dropout_rate = cfg.dropout_rate

    def _attend(self, x: Float[Array, "B T D"], positions: Int[Array, "*pb T"], cache: Any,
                k_attn: PRNGKeyArray | None, k_drop: PRNGKeyArray | None, segment_ids: Array | None = None
                ) -> tuple[Float[Array, "B T D"], Any]:
        if segment_ids is None:  # the plain program: the attention's signature as before
            h, cache = self.attn(self.attn_norm(x), positions, cache, key=k_attn)
        else:
            h, cache = self.attn(self.attn_norm(x), positions, cache, key=k_attn, segment_ids=segment_ids)
        return x + dropout(h, self.dropout_rate, k_drop), cache

    def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "*pb T"], cache: Any = None,
                 *, key: PRNGKeyArray | None = None, segment_ids: Int[Array, "B T"] | None = None
                 ) -> tuple[Float[Array, "B T D"], Scalar, Any]:
        k_attn, k1, k2 = split_key(key, 3)
        x, cache = self._attend(x, positions, cache, k_attn, k1, segment_ids)
        h, balance = self.mlp(self.mlp_norm(x), key=fold_key(k2, 1))  # k2 itself: the residual dropout
        x = x + dropout(h, self.dropout_rate, k2)
        return x, balance, cache

    def expert_counts(self, x: Float[Array, "B T D"], positions: Int[Array, "*pb T"]
                      ) -> tuple[Float[Array, "B T D"], Int[Array, " E"]]:
        """The block's dropout-free forward and the tokens its MoE routed to each expert."""
        x, _ = self._attend(x, positions, None, None, None)
        h = self.mlp_norm(x)
        return x + self.mlp(h)[0], self.mlp.expert_counts(h)


_REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,
}


# --------------------------------------------------------------------------- transformer
class Transformer(eqx.Module):
    """A decoder-only language model. Immutable; build with `Transformer(config, key=key)`.

    `model(tokens)` -> (logits (B, T, V), balance loss scalar); see `__call__` and `decode`.
    """

    embedding: Float[Array, "V D"]
    pos_embedding: Float[Array, "C D"] | None  # learned absolute positions (trainable_pos)
    blocks: Block | tuple[Block, ...]  # stacked: each array has a leading num_blocks axis (see unstack_blocks)
    norm: Norm
    head: Linear | None  # None with weight tying: logits = h @ embedding.T
    vocab_size: int = eqx.field(static=True)
    max_context: int = eqx.field(static=True)
    absolute_pos: bool = eqx.field(static=True)
    dropout_rate: float = eqx.field(static=True)
    remat: str = eqx.field(static=True)
    scan_unroll: int = eqx.field(static=True)
    logit_softcap: float | None = eqx.field(static=True)  # cap * tanh(logits / cap); None: off
    loss_chunk: int = eqx.field(static=True, default=0)  # config.loss_chunk (0 auto, -1 never)

    def __init__(self, config: Config, *, key: PRNGKeyArray):
        if config.vocab_size is None:
            raise ValueError("vocab_size: Transformer needs config.vocab_size (set it from the "
                             "tokenizer: config.replace(vocab_size=tok.get_vocab_size()))")
        k_emb, k_pos, k_blocks, k_head = jax.random.split(key, 4)
        V, D = config.vocab_size, config.dim
        self.embedding = normal_init(k_emb, (V, D), 0.02)
        self.absolute_pos = config.absolute_pos
        self.pos_embedding = (normal_init(k_pos, (config.max_context, D), 0.02)
                              if config.absolute_pos and config.trainable_pos else None)
        block_keys = jax.random.split(k_blocks, config.num_blocks)
        self.blocks = eqx.filter_vmap(lambda k: Block(config, key=k))(block_keys)
        self.norm = Norm(D, config.norm_type, config.norm_eps)
        self.head = None if config.weight_tying else Linear(D, V, key=k_head)
        self.vocab_size, self.max_context = V, config.max_context
        self.dropout_rate = config.dropout_rate
        self.remat, self.scan_unroll = config.effective_remat, config.effective_scan_unroll
        self.logit_softcap = config.logit_softcap
        self.loss_chunk = config.loss_chunk

    @classmethod
    def build(cls, config: Config, *, key: PRNGKeyArray) -> Transformer:
        """`Transformer(config, key=key)` as ONE compiled program, with the same arrays: built
        eagerly, every initialiser is a small XLA program of its own (a 1-step run of a 2-block
        model spent 4.2 of its 19 s there), and the persistent compilation cache keeps this one
        program for the next run."""
        return _build(config, key)

    @property
    def num_blocks(self) -> int:
        if isinstance(self.blocks, tuple):
            return len(self.blocks)
        return jax.tree.leaves(eqx.filter(self.blocks, eqx.is_array))[0].shape[0]

    # -- pieces shared by the full and the cached forward
    def embed(self, tokens: Int[Array, "B T"], positions: Int[Array, "*pb T"]) -> Float[Array, "B T D"]:
        x = jnp.take(self.embedding, tokens, axis=0)
        if self.absolute_pos:
            if self.pos_embedding is not None:
                pos = jnp.take(self.pos_embedding, jnp.clip(positions, 0, self.max_context - 1), axis=0)
            else:
                pos = sinusoidal(positions, x.shape[-1])
            x = x + pos.astype(x.dtype)
        return x

    @property
    def head_weight(self) -> Float[Array, "D V"]:
        """The output projection as a (D, V) matrix: the head's, or the tied embedding's transpose."""
        return self.head.weight if self.head is not None else self.embedding.T

    def _logits(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        return self._project(self.norm(x))

    def _project(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        logits = self.head(x) if self.head is not None else matmul(x, self.embedding.T)
        if self.logit_softcap is None:
            return logits
        cap = self.logit_softcap  # in float32: tanh's saturation is where bfloat16 is coarsest
        return (cap * jnp.tanh(logits.astype(jnp.float32) / cap)).astype(logits.dtype)

    def _run_blocks(self, x: Array, positions: Array, caches: Any, key: PRNGKeyArray | None,
                    segment_ids: Array | None = None) -> tuple[Array, Scalar, Any]:
        if isinstance(self.blocks, tuple):  # unstack_blocks: one Block per layer, a Python loop
            return _run_unstacked(self.blocks, x, positions, caches, key, segment_ids)
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)
        keys = None if key is None else jax.random.split(key, self.num_blocks)

        def body(h, layer):
            params, cache, k = layer
            params, h = constrain_layer(params, h)  # FSDP: gather this one layer here (sharding.py)
            h, balance, cache = eqx.combine(params, static)(h, positions, cache, key=k, segment_ids=segment_ids)
            return h, (balance, cache)

        policy = _REMAT_POLICIES.get(self.remat)
        if policy is None and layers_gathered():  # FSDP: re-gather each layer for the backward
            policy = GATHERED_NOT_SAVED
        if policy is not None:
            body = jax.checkpoint(body, policy=policy)
        x, (balance, caches) = jax.lax.scan(body, x, (dynamic, caches, keys), unroll=self.scan_unroll)
        return x, balance.mean(), caches

    # -- public API
    def __call__(self, tokens: Int[Array, "B T"], *, key: PRNGKeyArray | None = None,
                 segment_ids: Int[Array, "B T"] | None = None, positions: Int[Array, "B T"] | None = None
                 ) -> tuple[Float[Array, "B T V"], Scalar]:
        """Full causal forward over `tokens` at positions 0..T-1 (T <= max_context).

        Returns logits (B, T, V) in the parameters' dtype and the MoE balance loss averaged
        over blocks (0 for dense models). `key` enables dropout (training); None = eval.

        Packed windows (issue 23): `segment_ids` (B, T), equal ids for the tokens of one example
        (document) and each example contiguous, keeps attention inside each example, and the
        positions restart at 0 at each example's start (`segment_positions`, or the given
        `positions`), so each example's logits are those it gets alone. Without them (None) the
        program is the plain causal one, unchanged.
        """
        h, balance = self.features(tokens, key=key, segment_ids=segment_ids, positions=positions)
        return self._project(h), balance

    def features(self, tokens: Int[Array, "B T"], *, key: PRNGKeyArray | None = None,
                 segment_ids: Int[Array, "B T"] | None = None, positions: Int[Array, "B T"] | None = None
                 ) -> tuple[Float[Array, "B T D"], Scalar]:
        """The full forward up to the final norm (what the head multiplies) and the balance loss:
        `__call__` without the logits, for losses that never materialise them (`token_loss`).
        `segment_ids` / `positions` as in `__call__`."""
        if segment_ids is None and positions is None:
            with jax.ensure_compile_time_eval():  # concrete: RoPE's tables become constants (nn/rope.py)
                positions = jnp.arange(tokens.shape[1])
        elif positions is None:
            positions = segment_positions(segment_ids)
        elif segment_ids is None:  # given positions alone: one segment per row
            segment_ids = jnp.zeros(tokens.shape, jnp.int32)
        k_emb, k_blocks = split_key(key, 2)
        x = dropout(self.embed(tokens, positions), self.dropout_rate, k_emb)
        x, balance, _ = self._run_blocks(x, positions, None, k_blocks, segment_ids)
        return self.norm(x), balance
    def token_loss(self, features: Float[Array, "B T D"], targets: Int[Array, "B T"],
                   weights: Float[Array, "B T"] | None = None) -> tuple[Scalar, Scalar]:
        """(sum of weights * cross-entropy, sum of weights) of the head on `features` (from
        `features`), float32, chunked by `loss_chunk` (nn/cross_entropy.py) so that the
        (B, T, V) logits are never whole when they are large. Mean loss = first / second."""
        D = features.shape[-1]
        n = features.shape[0] * features.shape[1]
        chunk = auto_chunk(n, self.vocab_size, self.loss_chunk)
        return chunked_cross_entropy(features.reshape(n, D), self.head_weight, targets.reshape(n),
                                     None if weights is None else weights.reshape(n), chunk,
                                     softcap=self.logit_softcap)

    def init_cache(self, batch: int, size: int | None = None, dtype: Any = None) -> Any:
        """An empty cache for `batch` sequences and `size` slots (default max_context), stacked
        over blocks. Its type is the attention's (KVCache, or the MLA latent cache)."""
        size = self.max_context if size is None else size
        dtype = self.embedding.dtype if dtype is None else dtype
        if isinstance(self.blocks, tuple):
            return tuple(block.attn.init_cache(batch, size, dtype) for block in self.blocks)
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)
        return jax.vmap(lambda p: eqx.combine(p, static).attn.init_cache(batch, size, dtype))(dynamic)

    def decode(self, tokens: Int[Array, "B T"], positions: Int[Array, "B T"], cache: Any, last: bool = False
               ) -> tuple[Float[Array, "B To V"], Any]:
        """Cached forward: run T new tokens at absolute `positions` (-1 = padding), reading and
        extending `cache`. Prefill is one call with the prompt; decoding calls it with T = 1.
        To = T, or 1 with `last`: only the last column's logits (a prefill needs no others)."""
        x = self.embed(tokens, positions)
        x, _, cache = self._run_blocks(x, positions, cache, None)
        return self._logits(x[:, -1:] if last else x), cache

    def expert_counts(self, tokens: Int[Array, "B T"]) -> Int[Array, "L E"]:
        """MoE models: tokens routed to each expert in each block by a full dropout-free forward
        over `tokens`, (num_blocks, n_experts) int32; each row sums to B * T * top_k (top-k
        assignments before capacity dropping). For logging; jit it if called often."""
        positions = jnp.arange(tokens.shape[1])
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)
        body = lambda x, params: eqx.combine(params, static).expert_counts(x, positions)
        _, counts = jax.lax.scan(body, self.embed(tokens, positions), dynamic)
        return counts


def segment_positions(segment_ids: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """Each token's position inside its segment: 0 at every change of `segment_ids` along T
    (and at t = 0), then counting up. Segments must be contiguous runs."""
    return jnp.arange(segment_ids.shape[-1]) - segment_starts(segment_ids)


def _run_unstacked(blocks: tuple[Block, ...], x: Array, positions: Array, caches: Any, key: PRNGKeyArray | None,
                   segment_ids: Array | None) -> tuple[Array, Scalar, Any]:
    """`_run_blocks` over a tuple of Blocks (`unstack_blocks`): the loop unrolled in Python,
    each layer's weights and cache separate arrays. `caches`: a tuple (one per block) or None."""
    keys = [None] * len(blocks) if key is None else list(jax.random.split(key, len(blocks)))
    caches = [None] * len(blocks) if caches is None else list(caches)
    balances, out = [], []
    for block, cache, k in zip(blocks, caches, keys):
        x, balance, cache = block(x, positions, cache, key=k, segment_ids=segment_ids)
        balances.append(balance)
        out.append(cache)
    return x, jnp.mean(jnp.stack(balances)), None if out[0] is None else tuple(out)


def unstack_blocks(model: Transformer, num_blocks: int | None = None) -> Transformer:
    """`model` with its stacked blocks split into a tuple of one Block per layer (the same
    values), for decoding: a scanned layer loop slices every layer's weights out of the stacks
    and XLA:CPU copies those slices each token (SmolLM2-135M: ~45 % of a decoded token's time,
    benchmarks/decode_profile.py), while separate arrays are read in place by the matmuls. The
    KV cache (`init_cache`) becomes a tuple of per-layer caches too. Idempotent. For inference:
    training code (LoRA surgery, sharding, checkpoints) expects the stacked form, except the
    trainer's own step (train/layer_layout.py). `num_blocks`: for a model-shaped tree whose
    blocks hold no arrays (the static part, a bool mask); default: the arrays' leading size."""
    if isinstance(model.blocks, tuple):
        return model
    dynamic, static = eqx.partition(model.blocks, eqx.is_array)
    layers = tuple(eqx.combine(jax.tree.map(lambda a, i=i: a[i], dynamic), static)
                   for i in range(model.num_blocks if num_blocks is None else num_blocks))
    return eqx.tree_at(lambda m: m.blocks, model, layers)


_build = eqx.filter_jit(lambda config, key: Transformer(config, key=key))  # Transformer.build


def with_max_context(model: Transformer, max_context: int) -> Transformer:
    """`model` with training window / KV-cache size `max_context` (issue 22).

    No weight of a RoPE (or sinusoidal) model depends on max_context: only the static field
    changes, the arrays are the same objects. A learned position table (trainable_pos) of C
    rows serves any max_context <= C with its first max_context rows (positions 0..N-1 are the
    same rows, so logits on a short input are unchanged); a longer one has no rows to use and
    is refused (ConfigError naming max_context)."""
    if max_context == model.max_context:
        return model
    if max_context < 1:
        raise ConfigError(f"max_context: {max_context} is not a positive number of tokens")
    if model.pos_embedding is not None:
        rows = model.pos_embedding.shape[0]
        if max_context > rows:
            raise ConfigError(f"max_context: the model's learned position table has {rows} rows, so "
                              f"max_context={max_context} cannot exceed {rows}; use max_context <= {rows}")
        model = eqx.tree_at(lambda m: m.pos_embedding, model, model.pos_embedding[:max_context])
    new = copy.copy(model)
    object.__setattr__(new, "max_context", max_context)  # a static field: not reachable by tree_at
    return new


def expert_counts(model: Transformer, tokens: Int[Array, "B T"]) -> Int[Array, "L E"]:
    """`model.expert_counts(tokens)` as a function (jit it with `eqx.filter_jit`)."""
    return model.expert_counts(tokens)


def param_counts(model_or_config: Any) -> tuple[int, int]:
    """(total, active per token) parameter counts of a model, or of the model a `Config`
    describes (shapes only, nothing allocated). Every array counts (embeddings included);
    active counts only top_k of the n_experts routed experts' weights. Dense: active = total."""
    if isinstance(model_or_config, Config):
        model = eqx.filter_eval_shape(Transformer, model_or_config, key=jax.random.key(0))
    else:
        model = model_or_config
    size = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree) if hasattr(a, "shape"))
    total = size(model)
    active = total
    for moe in find_modules(model, MoE):
        routed = size(moe.up) + size(moe.down)
        active -= routed * (moe.n_experts - moe.top_k) // moe.n_experts
    return total, active
