"""The GPT: embedding -> scanned stack of pre-norm blocks -> norm -> head. All of it, one file.

Shapes: B batch, T new tokens, S key slots (T in training, the cache size when decoding),
D = dim, H query heads, K kv heads (GQA: H = K * G), E = head_size, V vocab.

Two deliberate departures from "modules take one example" (STYLE.md section 2):
- Modules take a batch `(B, T, ...)`: every `Linear` flattens (B, T) into one matmul axis. On
  XLA:CPU the vmapped form computes weight gradients as B batched matmuls and a reduction,
  which made the backward 5x the forward; the flat form is one GEMM (step 80 -> 60 ms).
- Attention reads explicit `positions` and an optional KV cache, so training, prefill and
  one-token decoding share one code path (and the cached path equals the full forward).

The blocks are stacked (every array has a leading `num_blocks` axis) and run with `lax.scan`,
so one block is traced whatever the depth. `scan_unroll` (config; default auto = every layer up
to 6 blocks) lets XLA unroll the loop: on XLA:CPU the rolled loop copies its carried stacks
every iteration (baby shape 62 -> 37 ms/step unrolled) for ~0.1 s more compile per block.
Block parts are swappable: the attention is `Attention` or `mla.MLAttention`, the MLP is `MLP`
or `moe.MoE`; every MLP returns `(y, balance_loss)` (0 for dense) and every attention
`(y, cache)`.
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, Scalar

from .config import Config
from .sharding import GATHERED_NOT_SAVED, constrain_layer, layers_gathered

__all__ = ["Transformer", "Block", "Attention", "MLP", "Linear", "Norm", "KVCache",
           "rope", "attend", "gelu", "activate", "matmul", "write_cache", "causal_mask", "dropout", "cast_floating"]

NEG_INF = -1e30  # finite: a fully masked row (left padding) gives a uniform softmax, not NaN


# --------------------------------------------------------------------------- basic layers
class Linear(eqx.Module):
    """y = x @ weight (no bias). Any leading axes; they are flattened into one GEMM."""

    weight: Float[Array, "d_in d_out"]

    def __init__(self, d_in: int, d_out: int, *, key: PRNGKeyArray, std: float = 0.02,
                 dtype: Any = jnp.float32):
        self.weight = normal_init(key, (d_in, d_out), std).astype(dtype)

    def __call__(self, x: Float[Array, "*lead d_in"]) -> Float[Array, "*lead d_out"]:
        return matmul(x, self.weight)


def normal_init(key: PRNGKeyArray, shape: tuple[int, ...], std: float) -> Float[Array, "..."]:
    """std * N(0, 1) samples. The barrier keeps XLA from folding `std` into the sampler's own
    constants when this runs inside a jit (`Transformer.build`): the arrays are then bitwise
    the eager ones (folded, a quarter of them differ in the last bit)."""
    return std * jax.lax.optimization_barrier(jax.random.normal(key, shape))


def matmul(x: Float[Array, "*lead d_in"], w: Float[Array, "d_in d_out"]) -> Float[Array, "*lead d_out"]:
    """x @ w with the leading axes flattened into one GEMM (see the module docstring)."""
    y = x.reshape(-1, x.shape[-1]) @ w.astype(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Norm(eqx.Module):
    """RMSNorm (or LayerNorm), computed in float32 and cast back to the input dtype."""

    scale: Float[Array, " dim"]
    bias: Float[Array, " dim"] | None
    kind: str = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, kind: str = "rmsnorm", eps: float = 1e-6):
        self.scale = jnp.ones((dim,))
        self.bias = jnp.zeros((dim,)) if kind == "layernorm" else None
        self.kind, self.eps = kind, eps

    def __call__(self, x: Float[Array, "*lead dim"]) -> Float[Array, "*lead dim"]:
        h = x.astype(jnp.float32)
        if self.kind == "layernorm":
            h = h - h.mean(-1, keepdims=True)
        h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + self.eps)
        h = h * self.scale.astype(jnp.float32)
        if self.bias is not None:
            h = h + self.bias.astype(jnp.float32)
        return h.astype(x.dtype)


def residual_std(cfg: Config) -> float:
    """Init std of the projections that write into the residual stream (attention out, MLP
    down): GPT-2's 0.02 / sqrt(2 L), so the stream's variance does not grow with depth; 0 with
    `zero_init_proj` (issue 16: every block starts as the identity, modded-nanogpt's init)."""
    return 0.0 if cfg.zero_init_proj else 0.02 / math.sqrt(2 * cfg.num_blocks)


def dropout(x: Array, rate: float, key: PRNGKeyArray | None) -> Array:
    """Inverted dropout; the identity when `rate == 0` or `key is None` (evaluation)."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _split(key: PRNGKeyArray | None, n: int) -> list[PRNGKeyArray | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast every floating-point array leaf of `tree` to `dtype` (e.g. for use_bf16)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating) else x,
        tree,
    )


# --------------------------------------------------------------------------- positions
def rope_base(head_dim: int, scale_factor: float = 1.0, base: float = 10000.0) -> float:
    """NTK-aware scaling: base * s^(d / (d - 2)) stretches the longest wavelengths by ~s while
    leaving the shortest ones nearly untouched (s = 1 gives the plain base)."""
    if scale_factor == 1.0:
        return base
    return base * scale_factor ** (head_dim / (head_dim - 2))


def rope(x: Float[Array, "*lead T n E"], positions: Int[Array, "*pb T"], base: float
         ) -> Float[Array, "*lead T n E"]:
    """Rotary embedding (rotate-half form) at absolute `positions`; float32 inside."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / base ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (*lead, T, E/2)
    cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def sinusoidal(positions: Int[Array, "*lead T"], dim: int) -> Float[Array, "*lead T dim"]:
    half = dim // 2
    inv_freq = 1.0 / 10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


# --------------------------------------------------------------------------- attention
class KVCache(eqx.Module):
    """A fixed-size ring buffer of keys and values for one layer (stacked over layers).

    Position p lives in slot p % S; `pos` records which absolute position each slot holds
    (-1 = empty), so masking needs no separate length and generation past S slides the window.
    """

    k: Float[Array, "B S K E"]
    v: Float[Array, "B S K E"]
    pos: Int[Array, "B S"]


def causal_mask(q_pos: Int[Array, "*pb T"], k_pos: Int[Array, "*pb S"], window: int | None = None,
                sink: bool = False) -> Array:
    """mask[..., t, s]: query at q_pos[t] may read key at k_pos[s] (k_pos < 0 = empty slot).

    Causal (k <= q); with `window`, only the last `window` positions (q - k < window), plus
    position 0 when `sink` keeps it as an attention sink.
    """
    q, k = q_pos[..., :, None], k_pos[..., None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        near = q - k < window
        mask = mask & ((near | (k == 0)) if sink else near)
    return mask


def attend(q: Float[Array, "B T K G E"], k: Float[Array, "B S K E"], v: Float[Array, "B S K Ev"],
           mask: Array, *, dropout_rate: float = 0.0, key: PRNGKeyArray | None = None
           ) -> Float[Array, "B T K G Ev"]:
    """Grouped softmax attention. `mask` broadcasts to (B, T, S) (or is (T, S)).

    Scores and the softmax are float32 even for bfloat16 inputs (accurate row sums). Without
    dropout the backward is the hand-written `_attention` rule (same values as autodiff).
    """
    mask = mask if mask.ndim == 2 else mask[:, None, None]
    if dropout_rate == 0.0 or key is None:
        return _attention(q, k, v, mask)
    probs = _softmax_probs(q, k, mask)
    probs = dropout(probs, dropout_rate, key).astype(v.dtype)
    return jnp.einsum("bkgts,bske->btkge", probs, v)


def _softmax_probs(q: Array, k: Array, mask: Array) -> Array:
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    return jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)


@jax.custom_vjp
def _attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    return _attention_fwd(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
    probs = _softmax_probs(q, k, mask)
    out = jnp.einsum("bkgts,bske->btkge", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype), (q, k, v, mask, probs, out)


def _attention_bwd(res, g):
    """The softmax backward as in FlashAttention: dS = P * (dP - rowsum(dO * O)). The row sum
    over the head size E replaces autodiff's sum of P * dP over the S keys, which XLA:CPU runs as
    a slow reduction fusion (baby shape: ~1 ms of the step)."""
    q, k, v, mask, probs, out = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    dv = jnp.einsum("bkgts,btkge->bske", probs.astype(g.dtype), g).astype(v.dtype)
    dp = jnp.einsum("btkge,bske->bkgts", g, v, preferred_element_type=jnp.float32)
    delta = jnp.einsum("btkge,btkge->bkgt", g.astype(jnp.float32), out)
    # Masked scores get no gradient (fully masked rows have a uniform, not a zero, softmax).
    ds = jnp.where(mask, probs * (dp - delta[..., None]) * scale, 0.0).astype(q.dtype)
    dq = jnp.einsum("bkgts,bske->btkge", ds, k).astype(q.dtype)
    dk = jnp.einsum("bkgts,btkge->bske", ds, q).astype(k.dtype)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


class Attention(eqx.Module):
    """Causal multi-head attention with grouped-query heads (K <= H) and RoPE."""

    qkv: Linear  # D -> (H + 2K) * E, one GEMM for all three projections
    o: Linear  # H * E -> D
    q_norm: Norm | None  # qk_norm (issue 16): RMSNorm over each head's E dims, before RoPE
    k_norm: Norm | None
    n_heads: int = eqx.field(static=True)
    kv_heads: int = eqx.field(static=True)
    head_size: int = eqx.field(static=True)
    rope_base: float | None = eqx.field(static=True)  # None: no rotary positions
    window: int | None = eqx.field(static=True)
    sink: bool = eqx.field(static=True)
    dropout_rate: float = eqx.field(static=True)
    impl: str = eqx.field(static=True)  # config.attention_impl: auto | fused | plain

    def __init__(self, cfg: Config, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        H, K, E = cfg.n_heads, cfg.effective_kv_heads, cfg.head_size
        self.qkv = Linear(cfg.dim, (H + 2 * K) * E, key=k1)
        self.o = Linear(H * E, cfg.dim, key=k2, std=residual_std(cfg))
        self.q_norm, self.k_norm = (Norm(E), Norm(E)) if cfg.qk_norm else (None, None)
        self.n_heads, self.kv_heads, self.head_size = H, K, E
        self.rope_base = rope_base(E, cfg.rope_scale_factor) if cfg.use_rotary_pos else None
        self.window = cfg.context_window if cfg.sliding_window else None
        self.sink = cfg.sliding_window and not cfg.no_sink
        self.dropout_rate = cfg.dropout_rate
        self.impl = cfg.attention_impl

    def _fused(self, dtype: Any, dropout: bool) -> bool:
        """Whether the full causal forward may use `jax.nn.dot_product_attention` (cuDNN's flash
        attention on GPUs): not with attention dropout or a sink (it has neither)."""
        if self.impl == "plain" or dropout or (self.window is not None and self.sink):
            return False
        return self.impl == "fused" or (jax.default_backend() == "gpu"
                                        and dtype in (jnp.bfloat16, jnp.float16))

    def init_cache(self, batch: int, size: int, dtype: Any) -> KVCache:
        shape = (batch, size, self.kv_heads, self.head_size)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                       jnp.full((batch, size), -1, jnp.int32))

    def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "*pb T"],
                 cache: KVCache | None = None, *, key: PRNGKeyArray | None = None
                 ) -> tuple[Float[Array, "B T D"], KVCache | None]:
        B, T, _ = x.shape
        H, K, E = self.n_heads, self.kv_heads, self.head_size
        q, k, v = jnp.split(self.qkv(x).reshape(B, T, H + 2 * K, E), [H, H + K], axis=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_base is not None:
            q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
        if cache is None and self._fused(q.dtype, self.dropout_rate > 0 and key is not None):
            # Training and eval see positions 0..T-1, so the mask is plain causal (+ window).
            window = None if self.window is None else (self.window - 1, 0)
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window)
            return self.o(out.reshape(B, T, H * E)), None
        if cache is None:
            mask = causal_mask(positions, positions, self.window, self.sink)
        else:
            cache = write_cache(cache, positions, k=k, v=v)
            k, v = cache.k, cache.v
            mask = causal_mask(jnp.broadcast_to(positions, (B, T)), cache.pos, self.window, self.sink)
        out = attend(q.reshape(B, T, K, H // K, E), k, v, mask,
                     dropout_rate=self.dropout_rate, key=key)
        return self.o(out.reshape(B, T, H * E)), cache


def write_cache(cache: Any, positions: Int[Array, "*pb T"], **new: Array) -> Any:
    """Write the new tokens' entries (`new[name]`: (B, T, ...)) into slot position % S.

    Positions < 0 (left padding) are not written. Returns the cache with `pos` updated.
    """
    B, S = cache.pos.shape
    positions = jnp.broadcast_to(positions, (B, positions.shape[-1]))
    slots = jnp.where(positions >= 0, positions % S, S)  # S is out of range: dropped
    rows = jnp.arange(B)[:, None]
    updates = {name: getattr(cache, name).at[rows, slots].set(val.astype(getattr(cache, name).dtype),
                                                               mode="drop")
               for name, val in new.items()}
    updates["pos"] = cache.pos.at[rows, slots].set(positions, mode="drop")
    return eqx.tree_at(lambda c: [getattr(c, n) for n in updates], cache, list(updates.values()))


# --------------------------------------------------------------------------- MLP
class MLP(eqx.Module):
    """Position-wise MLP of width expansion * dim: SwiGLU (gate and up in one GEMM) or GELU."""

    up: Linear
    down: Linear
    swiglu: bool = eqx.field(static=True)
    activation: str = eqx.field(static=True)

    def __init__(self, cfg: Config, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        hidden = cfg.expansion * cfg.dim
        self.up = Linear(cfg.dim, (2 if cfg.use_swiglu else 1) * hidden, key=k1)
        self.down = Linear(hidden, cfg.dim, key=k2, std=residual_std(cfg))
        self.swiglu, self.activation = cfg.use_swiglu, cfg.activation

    def __call__(self, x: Float[Array, "B T D"]) -> tuple[Float[Array, "B T D"], Scalar]:
        h = self.up(x)
        if self.swiglu:
            gate, h = jnp.split(h, 2, axis=-1)
            h = jax.nn.silu(gate) * h
        else:
            h = activate(self.activation, h)
        return self.down(h), jnp.zeros((), jnp.float32)


def activate(name: str, x: Array) -> Array:
    """config.activation: gelu (tanh form, `gelu`), relu, silu, or relu2 = relu(x)^2 (issue 16;
    modded-nanogpt's ReLU squared)."""
    if name == "gelu":
        return gelu(x)
    if name == "relu2":
        return jnp.square(jax.nn.relu(x))
    return getattr(jax.nn, name)(x)


@jax.custom_vjp
def gelu(x: Array) -> Array:
    """`jax.nn.gelu` (tanh form) whose backward recomputes tanh from x: autodiff saves tanh's
    output as a second (B, T, hidden) residual, one more pass over memory (~1 ms of the baby step)."""
    return jax.nn.gelu(x)


def _gelu_bwd(x: Array, g: Array) -> tuple[Array]:
    c = math.sqrt(2.0 / math.pi)
    xf = x.astype(jnp.float32)
    t = jnp.tanh(c * (xf + 0.044715 * xf**3))
    slope = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * xf * xf)
    return ((g * slope).astype(x.dtype),)


gelu.defvjp(lambda x: (jax.nn.gelu(x), x), _gelu_bwd)


# --------------------------------------------------------------------------- block
def _make_attention(cfg: Config, key: PRNGKeyArray) -> eqx.Module:
    if cfg.mla:
        from .mla import MLAttention  # noqa: PLC0415 (kept out of the dense import path)

        return MLAttention(cfg, key=key)
    return Attention(cfg, key=key)


def _make_mlp(cfg: Config, key: PRNGKeyArray) -> eqx.Module:
    if cfg.use_moe:
        from .moe import MoE  # noqa: PLC0415

        return MoE(cfg, key=key)
    return MLP(cfg, key=key)


class Block(eqx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    attn_norm: Norm
    attn: eqx.Module
    mlp_norm: Norm
    mlp: eqx.Module
    dropout_rate: float = eqx.field(static=True)

    def __init__(self, cfg: Config, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.attn_norm, self.mlp_norm = Norm(cfg.dim, cfg.norm_type), Norm(cfg.dim, cfg.norm_type)
        self.attn, self.mlp = _make_attention(cfg, k1), _make_mlp(cfg, k2)
        self.dropout_rate = cfg.dropout_rate

    def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "*pb T"], cache: Any = None,
                 *, key: PRNGKeyArray | None = None) -> tuple[Float[Array, "B T D"], Scalar, Any]:
        k_attn, k1, k2 = _split(key, 3)
        h, cache = self.attn(self.attn_norm(x), positions, cache, key=k_attn)
        x = x + dropout(h, self.dropout_rate, k1)
        h, balance = self.mlp(self.mlp_norm(x))
        x = x + dropout(h, self.dropout_rate, k2)
        return x, balance, cache


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
    blocks: Block  # stacked: each array has a leading num_blocks axis
    norm: Norm
    head: Linear | None  # None with weight tying: logits = h @ embedding.T
    vocab_size: int = eqx.field(static=True)
    max_context: int = eqx.field(static=True)
    absolute_pos: bool = eqx.field(static=True)
    dropout_rate: float = eqx.field(static=True)
    remat: str = eqx.field(static=True)
    scan_unroll: int = eqx.field(static=True)
    logit_softcap: float | None = eqx.field(static=True)  # issue 16: cap * tanh(logits / cap)

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
        self.norm = Norm(D, config.norm_type)
        self.head = None if config.weight_tying else Linear(D, V, key=k_head)
        self.vocab_size, self.max_context = V, config.max_context
        self.dropout_rate = config.dropout_rate
        self.remat, self.scan_unroll = config.effective_remat, config.effective_scan_unroll
        self.logit_softcap = config.logit_softcap

    @classmethod
    def build(cls, config: Config, *, key: PRNGKeyArray) -> Transformer:
        """`Transformer(config, key=key)` as ONE compiled program, with the same arrays (issue
        16): built eagerly, every initialiser is a small XLA program of its own (a 1-step run
        of a 2-block model spent 4.2 of its 19 s there), and the persistent compilation cache
        keeps this one program for the next run."""
        return _build(config, key)

    @classmethod
    def from_pretrained(cls, run_dir: Any, best: bool = True, *, dtype: Any = None) -> Transformer:
        """Load a trained run directory's model (best checkpoint, or latest with best=False) in
        the dtype it was saved in; see `pretrained.from_pretrained`."""
        from .pretrained import from_pretrained  # noqa: PLC0415 (orbax stays off the model's import path)

        return from_pretrained(run_dir, best, dtype=dtype)

    @property
    def num_blocks(self) -> int:
        return jax.tree.leaves(eqx.filter(self.blocks, eqx.is_array))[0].shape[0]

    # -- pieces shared by the full and the cached forward
    def _embed(self, tokens: Int[Array, "B T"], positions: Int[Array, "*pb T"]) -> Float[Array, "B T D"]:
        x = jnp.take(self.embedding, tokens, axis=0)
        if self.absolute_pos:
            if self.pos_embedding is not None:
                pos = jnp.take(self.pos_embedding, jnp.clip(positions, 0, self.max_context - 1), axis=0)
            else:
                pos = sinusoidal(positions, x.shape[-1])
            x = x + pos.astype(x.dtype)
        return x

    def _logits(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        x = self.norm(x)
        logits = self.head(x) if self.head is not None else matmul(x, self.embedding.T)
        if self.logit_softcap is None:
            return logits
        cap = self.logit_softcap  # in float32: tanh's saturation is where bfloat16 is coarsest
        return (cap * jnp.tanh(logits.astype(jnp.float32) / cap)).astype(logits.dtype)

    def _run_blocks(self, x: Array, positions: Array, caches: Any, key: PRNGKeyArray | None
                    ) -> tuple[Array, Scalar, Any]:
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)
        keys = None if key is None else jax.random.split(key, self.num_blocks)

        def body(h, layer):
            params, cache, k = layer
            params, h = constrain_layer(params, h)  # FSDP: gather this one layer here (sharding.py)
            h, balance, cache = eqx.combine(params, static)(h, positions, cache, key=k)
            return h, (balance, cache)

        policy = _REMAT_POLICIES.get(self.remat)
        if policy is None and layers_gathered():  # FSDP: re-gather each layer for the backward
            policy = GATHERED_NOT_SAVED
        if policy is not None:
            body = jax.checkpoint(body, policy=policy)
        x, (balance, caches) = jax.lax.scan(body, x, (dynamic, caches, keys), unroll=self.scan_unroll)
        return x, balance.mean(), caches

    # -- public API
    def __call__(self, tokens: Int[Array, "B T"], *, key: PRNGKeyArray | None = None
                 ) -> tuple[Float[Array, "B T V"], Scalar]:
        """Full causal forward over `tokens` at positions 0..T-1 (T <= max_context).

        Returns logits (B, T, V) in the parameters' dtype and the MoE balance loss averaged
        over blocks (0 for dense models). `key` enables dropout (training); None = eval.
        """
        positions = jnp.arange(tokens.shape[1])
        k_emb, k_blocks = _split(key, 2)
        x = dropout(self._embed(tokens, positions), self.dropout_rate, k_emb)
        x, balance, _ = self._run_blocks(x, positions, None, k_blocks)
        return self._logits(x), balance

    def init_cache(self, batch: int, size: int | None = None, dtype: Any = None) -> Any:
        """An empty cache for `batch` sequences and `size` slots (default max_context), stacked
        over blocks. Its type is the attention's (KVCache, or the MLA latent cache)."""
        size = self.max_context if size is None else size
        dtype = self.embedding.dtype if dtype is None else dtype
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)
        return jax.vmap(lambda p: eqx.combine(p, static).attn.init_cache(batch, size, dtype))(dynamic)

    def decode(self, tokens: Int[Array, "B T"], positions: Int[Array, "B T"], cache: Any
               ) -> tuple[Float[Array, "B T V"], Any]:
        """Cached forward: run T new tokens at absolute `positions` (-1 = padding), reading and
        extending `cache`. Prefill is one call with the prompt; decoding calls it with T = 1."""
        x = self._embed(tokens, positions)
        x, _, cache = self._run_blocks(x, positions, cache, None)
        return self._logits(x), cache


_build = eqx.filter_jit(lambda config, key: Transformer(config, key=key))  # Transformer.build
