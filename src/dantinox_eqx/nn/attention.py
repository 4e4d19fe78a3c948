"""Causal grouped-query attention with RoPE and a ring-buffer KV cache.

Shapes: B batch, T new tokens, S key slots (T in training, the cache size when decoding),
D = dim, H query heads, K kv heads (GQA: H = K * G), E = head_size.

Attention reads explicit `positions` and an optional KV cache, so training, prefill and
one-token decoding share one code path (and the cached path equals the full forward). The
softmax backward is hand-written (`_attention_bwd`, as in FlashAttention), on each kv head's
queries as the rows of one matrix (`_as_rows`).
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .functional import dropout, fold_key
from .linear import Linear, add_bias
from .norm import Norm
from .rope import rope

__all__ = ["Attention", "KVCache", "attend", "attend_causal", "causal_mask", "segment_mask", "segment_starts",
           "write_cache", "cached_mask", "NEG_INF"]

NEG_INF = -1e30  # finite: a fully masked row (left padding) gives a uniform softmax, not NaN


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


def segment_starts(segment_ids: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """The index of each token's segment's first token: segments are the contiguous runs of
    equal `segment_ids` along T (a new one at every change, and at t = 0)."""
    idx = jnp.arange(segment_ids.shape[-1])
    changes = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], bool),
                               segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    return jax.lax.cummax(jnp.where(changes, idx, 0), axis=segment_ids.ndim - 1)


def segment_mask(positions: Int[Array, "B T"], segment_ids: Int[Array, "B T"], window: int | None = None,
                 sink: bool = False) -> Bool[Array, "B T T"]:
    """Packed windows (issue 23): mask[b, t, s] = token t may read token s of the same row.

    Both tokens must belong to the same segment (example or document) and s must come first;
    `positions` restart at 0 at each segment's start and grow by one inside it, so the causal
    test on positions is the causal test on indices within a segment, and `window` / `sink`
    (position 0 = the segment's first token) apply per segment as they do to a lone example.
    """
    # Segments are contiguous runs of equal ids, so "same segment and not later" is
    # start[t] <= s <= t: an index test that needs one (B, T) vector, where comparing the ids
    # of every (t, s) pair costed ~5 % of a packed training step (issue 23).
    idx = jnp.arange(segment_ids.shape[-1])
    mask = (idx[None, :] <= idx[:, None]) & (idx >= segment_starts(segment_ids)[..., :, None])
    if window is not None:
        mask = mask & causal_mask(positions, positions, window, sink)
    return mask


def attend(q: Float[Array, "B T K G E"], k: Float[Array, "B S K E"], v: Float[Array, "B S K Ev"],
           mask: Array, *, dropout_rate: float = 0.0, key: PRNGKeyArray | None = None
           ) -> Float[Array, "B T K G Ev"]:
    """Grouped softmax attention. `mask` broadcasts to (B, T, S) (or is (T, S)).

    Scores and the softmax are float32 even for bfloat16 inputs (accurate row sums). Without
    dropout the backward is the hand-written `_attention` rule (same values as autodiff), on the
    heads laid out as matrices (`_as_rows`).
    """
    rows, k_t, v_rows = _as_rows(q, k, v)
    row_mask = _row_mask(mask, q.shape[3])
    if dropout_rate == 0.0 or key is None:
        return _from_rows(_attention(rows, k_t, v_rows, row_mask), q.shape)
    probs = dropout(_softmax_probs(rows, k_t, row_mask), dropout_rate, key).astype(v.dtype)
    return _from_rows(jnp.matmul(probs, v_rows), q.shape)


CAUSAL_BLOCK = 64  # query rows per block of `attend_causal` (at least; at most 16 blocks)


def attend_causal(q: Float[Array, "B T K G E"], k: Float[Array, "B T K E"], v: Float[Array, "B T K Ev"],
                  mask: Bool[Array, "T T"], block: int | None = None) -> Float[Array, "B T K G Ev"]:
    """`attend` without dropout for T queries over the same T keys at increasing positions
    (training, evaluation, prefill without a cache): query rows [t0, t1) read keys [0, t1) only,
    since every later key is masked for them. A causal window thus skips the upper triangle's
    blocks: (n + 1) / 2n of the scores for n blocks. Equal to `attend` up to float32 summation
    order (the skipped scores are exact zeros after the softmax). `block` None: CAUSAL_BLOCK
    query positions, or T / 16 when that is more (SmolLM2-135M's attention, fwd + bwd at T 256:
    blocks of 64 take 0.85x the time of 128 and 0.78x of one block; issue 25)."""
    T, G = q.shape[1], q.shape[3]
    block = block or max(CAUSAL_BLOCK, -(-T // 16))
    if T <= block:
        return attend(q, k, v, mask)
    rows, k_t, v_rows = _as_rows(q, k, v)
    row_mask = _row_mask(mask, G)
    ends = list(range(block, T, block)) + [T]
    # A split, not slices: its gradient is one concatenation of the blocks' query gradients,
    # where slices' is a zero-padded full-size copy per block, then their sum.
    row_blocks = jnp.split(rows, [t * G for t in ends[:-1]], axis=2)
    outs = [_attention(r, k_t[..., :t1], v_rows[:, :, :t1], row_mask[t0 * G:t1 * G, :t1])
            for r, t0, t1 in zip(row_blocks, [0] + ends[:-1], ends)]
    return _from_rows(jnp.concatenate(outs, axis=2), q.shape)


def _as_rows(q: Float[Array, "B T K G E"], k: Float[Array, "B S K E"], v: Float[Array, "B S K Ev"]
             ) -> tuple[Float[Array, "B K TG E"], Float[Array, "B K E S"], Float[Array, "B K S Ev"]]:
    """The heads as the matrices of plain batched matmuls: each kv head's T * G query rows
    (row t * G + g), its keys transposed (E, S) and its values (S, Ev). Every product of
    `_attention` then reads its (rows, S)-sized operands as they are and transposes only
    (S, E)-sized ones: in the (B, T, K, G, E) layout XLA:CPU copied each score-sized array into
    two transposed forms, forward and backward (SmolLM2-135M's attention fwd + bwd at T 256:
    10.7 -> 6.1 ms a layer; issue 25)."""
    B, T, K, G, E = q.shape
    return (q.transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, E), k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3))


def _from_rows(out: Float[Array, "B K TG Ev"], q_shape: tuple[int, ...]) -> Float[Array, "B T K G Ev"]:
    B, T, K, G, _ = q_shape
    return out.reshape(B, K, T, G, out.shape[-1]).transpose(0, 2, 1, 3, 4)


def _row_mask(mask: Array, G: int) -> Array:
    """A (T, S) or (B, T, S) mask for the (B, K, T * G, S) scores of `_as_rows`' layout."""
    if mask.ndim == 2:
        return jnp.repeat(mask, G, axis=0)  # (T G, S): broadcasts over B and K
    return jnp.repeat(mask, G, axis=1)[:, None]  # (B, 1, T G, S)


def _softmax_probs(rows: Array, k_t: Array, mask: Array) -> Array:
    """The float32 softmax of the scaled, masked scores rows @ k_t, (B, K, M, S)."""
    scale = 1.0 / math.sqrt(rows.shape[-1])
    scores = jnp.matmul(rows, k_t, preferred_element_type=jnp.float32) * scale
    return jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)


@jax.custom_vjp
def _attention(rows: Array, k_t: Array, v: Array, mask: Array) -> Array:
    """Softmax attention of query rows (B, K, M, E) over keys k_t (B, K, E, S) and values
    v (B, K, S, Ev), `mask` broadcasting to (B, K, M, S): the (B, K, M, Ev) outputs."""
    return _attention_fwd(rows, k_t, v, mask)[0]


def _attention_fwd(rows, k_t, v, mask):
    probs = _softmax_probs(rows, k_t, mask)
    out = jnp.matmul(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype), (rows, k_t, v, mask, probs, out)


def _attention_bwd(res, g):
    """The softmax backward as in FlashAttention: dS = P * (dP - rowsum(dO * O)). The row sum
    over the head size replaces autodiff's sum of P * dP over the S keys, which XLA:CPU runs as
    a slow reduction fusion (baby shape: ~1 ms of the step). The key and value gradients are
    computed transposed, (E, M) @ (M, S), so that the score-sized P and dS are read as stored."""
    rows, k_t, v, mask, probs, out = res
    scale = 1.0 / math.sqrt(rows.shape[-1])
    dv_t = jnp.matmul(jnp.swapaxes(g, -1, -2), probs.astype(g.dtype))  # (B, K, Ev, S)
    dp = jnp.matmul(g, jnp.swapaxes(v, -1, -2), preferred_element_type=jnp.float32)
    delta = jnp.sum(g.astype(jnp.float32) * out, axis=-1, keepdims=True)
    # Masked scores get no gradient (fully masked rows have a uniform, not a zero, softmax).
    ds = jnp.where(mask, probs * (dp - delta) * scale, 0.0).astype(rows.dtype)
    d_rows = jnp.matmul(ds, jnp.swapaxes(k_t, -1, -2)).astype(rows.dtype)
    dk_t = jnp.matmul(jnp.swapaxes(rows, -1, -2), ds).astype(k_t.dtype)  # (B, K, E, S)
    return d_rows, dk_t, jnp.swapaxes(dv_t, -1, -2).astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


class Attention(eqx.Module):
    """Causal multi-head attention with grouped-query heads (K <= H) and RoPE."""

    qkv: Linear  # D -> (H + 2K) * E, one GEMM for all three projections
    o: Linear  # H * E -> D
    q_norm: Norm | None  # qk_norm: RMSNorm over each head's E dims of q and k, before RoPE
    k_norm: Norm | None
    qkv_bias: Float[Array, " qkv"] | None  # (H + 2K) * E with qkv_bias, else None
    o_bias: Float[Array, " D"] | None  # with o_bias, else None
    n_heads: int = eqx.field(static=True)
    kv_heads: int = eqx.field(static=True)
    head_size: int = eqx.field(static=True)
    rope_base: float | None = eqx.field(static=True)  # None: no rotary positions
    window: int | None = eqx.field(static=True)
    sink: bool = eqx.field(static=True)
    dropout_rate: float = eqx.field(static=True)
    impl: str = eqx.field(static=True)  # config.attention_impl: auto | fused | plain

    def __init__(self, dim: int, n_heads: int, kv_heads: int, head_size: int, *, key: PRNGKeyArray,
                 rope_base: float | None = 10000.0, window: int | None = None, sink: bool = False,
                 dropout_rate: float = 0.0, impl: str = "auto", out_std: float = 0.02,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False):
        """`dim` D -> H = n_heads query heads and K = kv_heads key/value heads (H % K == 0) of
        `head_size` E -> D. `rope_base` None: no rotary positions. `window`: sliding-window
        attention over the last `window` positions (+ position 0 with `sink`). `out_std`: the
        output projection's init std (it writes into the residual stream)."""
        k1, k2 = jax.random.split(key)
        H, K, E = n_heads, kv_heads, head_size
        self.qkv = Linear(dim, (H + 2 * K) * E, key=k1)
        self.o = Linear(H * E, dim, key=k2, std=out_std)
        self.q_norm, self.k_norm = (Norm(E), Norm(E)) if qk_norm else (None, None)
        self.qkv_bias = jnp.zeros(((H + 2 * K) * E,)) if qkv_bias else None
        self.o_bias = jnp.zeros((dim,)) if o_bias else None
        self.n_heads, self.kv_heads, self.head_size = H, K, E
        self.rope_base, self.window, self.sink = rope_base, window, sink
        self.dropout_rate, self.impl = dropout_rate, impl

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
                 cache: KVCache | None = None, *, key: PRNGKeyArray | None = None,
                 segment_ids: Int[Array, "B T"] | None = None) -> tuple[Float[Array, "B T D"], KVCache | None]:
        """`segment_ids` (no cache): a packed window, attention kept inside each segment and
        `positions` (B, T) restarting at each segment's start (`segment_mask`)."""
        B, T, _ = x.shape
        H, K, E = self.n_heads, self.kv_heads, self.head_size
        qkv = add_bias(self.qkv(x, key=fold_key(key, 1)), self.qkv_bias)
        q, k, v = jnp.split(qkv.reshape(B, T, H + 2 * K, E), [H, H + K], axis=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_base is not None:
            q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
        out, cache = self._attend(q, k, v, positions, cache, key, segment_ids)
        return add_bias(self.o(out.reshape(B, T, H * E), key=fold_key(key, 2)), self.o_bias), cache

    def _attend(self, q: Array, k: Array, v: Array, positions: Array, cache: KVCache | None,
                key: PRNGKeyArray | None, segment_ids: Array | None) -> tuple[Array, KVCache | None]:
        """The heads' outputs (B, T, ...: H * E per token) of q (B, T, H, E) over k, v, and the
        cache as updated (None without one), by the cheapest form that computes them."""
        B, T, H, E = q.shape
        grouped = q.reshape(B, T, self.kv_heads, H // self.kv_heads, E)
        dropout = self.dropout_rate > 0 and key is not None
        if segment_ids is not None:
            mask = segment_mask(positions, segment_ids, self.window, self.sink)
            return attend(grouped, k, v, mask, dropout_rate=self.dropout_rate, key=key), None
        if cache is None and self._fused(q.dtype, dropout):
            # Training and eval see positions 0..T-1, so the mask is plain causal (+ window).
            window = None if self.window is None else (self.window - 1, 0)
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window), None
        mask, cache = cached_mask(positions, cache, self.window, self.sink, k=k, v=v)
        if cache is None and positions.ndim == 1 and not dropout:
            # T queries over themselves at increasing positions: skip the masked key blocks.
            return attend_causal(grouped, k, v, mask), None
        if cache is not None:
            k, v = cache.k, cache.v
        return attend(grouped, k, v, mask, dropout_rate=self.dropout_rate, key=key), cache


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




def cached_mask(positions: Int[Array, "*pb T"], cache: Any, window: int | None, sink: bool, **new: Array
                ) -> tuple[Array, Any]:
    """(mask, cache) for T new tokens at `positions`: without a cache, the causal mask over the
    new tokens (the cache stays None); with one, `new` (B, T, ...) written into it first and
    the mask over every slot it holds. Shared by every attention with a KV cache."""
    if cache is None:
        return causal_mask(positions, positions, window, sink), None
    cache = write_cache(cache, positions, **new)
    B = cache.pos.shape[0]
    return causal_mask(jnp.broadcast_to(positions, (B, positions.shape[-1])), cache.pos, window, sink), cache
