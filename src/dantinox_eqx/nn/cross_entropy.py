"""Cross-entropy of a linear head without the (tokens, vocab) logits ever existing whole.

    loss_sum, weight_sum = chunked_cross_entropy(hidden, head, targets, weights, chunk)
    loss = loss_sum / weight_sum

A 49152-token vocabulary at batch 8 x 256 makes float32 logits of 400 MB, plus as much again
for their gradient. Here the tokens are cut into chunks of `chunk` rows and a `lax.scan` computes
one chunk's logits, their logsumexp and the target's logit at a time (MaxText's vocabulary
tiling, Liger-Kernel's fused linear cross-entropy). The gradient is computed in the same pass,
chunk by chunk (a `custom_vjp` whose forward returns d loss_sum / d hidden and / d head): the
head's three matmuls (forward, d hidden, d head) run once each, as in the plain computation, with
no chunk's logits recomputed or stored for the backward. Without differentiation only the loss
pass runs.

Below the threshold (`chunk` None) the logits are whole, and the backward is written by hand
too (`_whole`): the forward keeps the logits and each token's log-sum-exp, and the backward is
one elementwise pass, d logits = w * (exp(z - lse) - onehot), and the head's matmuls. Autodiff
of the same loss makes three passes over the (N, V) logits and scatters the one-hot into a
zeroed (N, V) array. With the log-sum-exp in tiles (`SUM_TILES`), SmolLM2's head + loss at
512 tokens: 415 -> 302 ms under LoRA, 560 -> 450 ms trained (benchmarks/head_loss_ab.py).

The arithmetic mirrors `Transformer._logits` followed by a float32 softmax cross-entropy: the
logits are computed in `hidden`'s dtype, the optional soft cap `cap * tanh(z / cap)` in float32
and rounded back to that dtype, and the softmax in float32; so in float32 every token's loss is
the plain computation's up to the order of the sums. `plain_cross_entropy` is that computation
left to autodiff: the reference the tests hold both paths to.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float, Int, Scalar

__all__ = ["chunked_cross_entropy", "plain_cross_entropy", "auto_chunk", "CHUNK_THRESHOLD_BYTES"]

# Chunk only when the float32 logits would exceed this: below it the plain computation is one
# large GEMM and one fused softmax, and the logits fit in cache-friendly sizes anyway (the baby
# shape's are 12 x 64 x 65 x 4 = 0.2 MB). 64 MiB is SmolLM2's vocabulary at ~340 tokens.
CHUNK_THRESHOLD_BYTES = 64 * 2**20
DEFAULT_CHUNK = 1024  # rows per chunk: 1024 x 49152 float32 logits = 192 MiB at most per chunk


def auto_chunk(n_tokens: int, vocab: int, setting: int = 0) -> int | None:
    """The chunk size the loss uses for `n_tokens` rows of a `vocab`-wide head, or None (plain).

    `setting` is `Config.loss_chunk`: 0 = automatic (chunks of DEFAULT_CHUNK rows when the
    float32 logits exceed CHUNK_THRESHOLD_BYTES), -1 = never chunk, n > 0 = chunks of n rows."""
    if setting < 0:
        return None
    if setting > 0:
        return setting if setting < n_tokens else None
    if n_tokens * vocab * 4 <= CHUNK_THRESHOLD_BYTES:
        return None
    return min(DEFAULT_CHUNK, n_tokens)


def _logits(h: Float[Array, "n D"], head: Float[Array, "D V"], softcap: float | None) -> Array:
    """The head's logits in h's dtype, soft-capped in float32 (as `Transformer._logits`)."""
    return _capped(h @ head.astype(h.dtype), softcap)


def _capped(z: Array, softcap: float | None) -> Array:
    if softcap is None:
        return z
    return (softcap * jnp.tanh(z.astype(jnp.float32) / softcap)).astype(z.dtype)


def _shifted(logits: Array) -> tuple[Float[Array, "n V"], Float[Array, " n"]]:
    """float32 logits minus their row max, and log sum exp of those: optax's
    softmax_cross_entropy_with_integer_labels step by step (the reference computation)."""
    z = logits.astype(jnp.float32)
    z = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    return z, jnp.log(jnp.sum(jnp.exp(z), axis=-1))


def _token_nll(logits: Array, targets: Int[Array, " n"]) -> Float[Array, " n"]:
    z, log_norm = _shifted(logits)
    return log_norm - jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0]


def _sum_tile(width: int) -> int | None:
    """The tile `_nll_and_lse` cuts a row of `width` into, or None (the row whole)."""
    return next((t for t in SUM_TILES if width % t == 0 and width > t), None)


# XLA:CPU computes a log-sum-exp over a 49152-wide row ~4x faster as max and sum of exponentials
# per tile of 2048 (one pass) and then over the tiles' results, as online softmax does (SmolLM2's
# 512 x 49152 losses: 92 -> 21 ms). Max first and then a tiled sum is no faster (XLA merges the
# two sums back into one). 128-wide tiles ~25 ms; 512-wide ones 52 ms, hence not in the list; a
# width with none of these divisors keeps the row whole.
SUM_TILES = (2048, 1024, 256, 128)


def _nll_and_lse(logits: Array, targets: Int[Array, " n"]) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    """Each row's loss, log-sum-exp - target logit, and its log-sum-exp, float32 (the reference
    `_token_nll`'s value up to rounding). The (n, V) logits are read, never rewritten: the
    target's logit is taken from them as they are."""
    z = logits.astype(jnp.float32)
    tile = _sum_tile(z.shape[-1])
    if tile is None:
        row_max = jnp.max(z, axis=-1)
        log_norm = jnp.log(jnp.sum(jnp.exp(z - row_max[:, None]), axis=-1))
    else:
        tiles = z.reshape(z.shape[0], -1, tile)
        tile_max = jnp.max(tiles, axis=-1)
        tile_sum = jnp.sum(jnp.exp(tiles - tile_max[..., None]), axis=-1)
        row_max = jnp.max(tile_max, axis=-1)
        log_norm = jnp.log(jnp.sum(tile_sum * jnp.exp(tile_max - row_max[:, None]), axis=-1))
    lse = log_norm + row_max
    return lse - jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0], lse


def _logits_grad(raw: Array, targets: Int[Array, " n"], lse: Float[Array, " n"], row_weights: Float[Array, " n"],
                 softcap: float | None) -> Array:
    """d (sum of row_weights * loss) / d raw, in raw's dtype, for raw = h @ head (before the soft
    cap): row_weights * (softmax - onehot), through the cast to float32 and the cap's
    derivative 1 - tanh^2, as autodiff of `_logits` + `_token_nll` computes it. One elementwise
    pass: the one-hot is a comparison with the column index, never an array of its own."""
    dtype = raw.dtype
    if softcap is None:
        z = raw.astype(jnp.float32)
    else:
        tanh = jnp.tanh(raw.astype(jnp.float32) / softcap)
        z = (softcap * tanh).astype(dtype).astype(jnp.float32)
    onehot = jnp.arange(z.shape[-1], dtype=targets.dtype)[None, :] == targets[:, None]
    dz = (jnp.exp(z - lse[:, None]) - onehot) * row_weights[:, None]
    if dtype != jnp.float32:
        dz = dz.astype(dtype).astype(jnp.float32)  # the transpose of the loss's cast to float32
    if softcap is not None:
        dz = dz * (1.0 - tanh * tanh)
    return dz.astype(dtype)


def plain_cross_entropy(hidden: Float[Array, "N D"], head: Float[Array, "D V"], targets: Int[Array, " N"],
                        weights: Float[Array, " N"] | None, softcap: float | None = None
                        ) -> tuple[Scalar, Scalar]:
    """(sum of weights * token losses, sum of weights), with the (N, V) logits materialised."""
    nll = _token_nll(_logits(hidden, head, softcap), targets)
    if weights is None:
        return jnp.sum(nll), jnp.float32(nll.shape[0])
    w = weights.astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def _chunks(hidden, targets, w, chunk):
    """Pad the rows (and their float32 weights `w`) to whole chunks (padding has weight 0) and
    cut them: (n_chunks, chunk, ...).
    Chunk c holds rows c, c + n_chunks, c + 2 n_chunks, ...: rows split over devices on their
    batch axis (data parallelism) stay split inside every chunk, so each device computes its
    own rows' share of each chunk instead of the scan visiting one device's rows at a time."""
    pad = -hidden.shape[0] % chunk
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    targets, w = jnp.pad(targets, (0, pad)), jnp.pad(w, (0, pad))
    cut = lambda a: a.reshape(chunk, -1, *a.shape[1:]).swapaxes(0, 1)
    return cut(hidden), cut(targets), cut(w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked(hidden, head, targets, w, chunk, softcap):
    """loss_sum over pre-cut chunks: hidden (C, chunk, D), targets / w (C, chunk)."""
    def one(total, xs):
        h, t, wc = xs
        return total + jnp.sum(_nll_and_lse(_logits(h, head, softcap), t)[0] * wc), None

    total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), (hidden, targets, w))
    return total


def _chunked_fwd(hidden, head, targets, w, chunk, softcap):
    """The loss and its gradients, chunk by chunk: d/dlogits = w * (softmax - onehot), times the
    soft cap's derivative 1 - tanh^2, rounded to the logits' dtype as the plain backward does.
    The head's gradient is accumulated only when the head is differentiated (`perturbed`;
    under LoRA it is frozen, and a plain backward would not compute it either)."""
    want_head = head.perturbed
    hidden, head, targets, w = hidden.value, head.value, targets.value, w.value
    head_c = head.astype(hidden.dtype)

    def one(carry, xs):
        total, d_head = carry
        h, t, wc = xs
        raw = h @ head_c
        nll, lse = _nll_and_lse(_capped(raw, softcap), t)
        dz = _logits_grad(raw, t, lse, wc, softcap)
        d_h = dz @ head_c.T
        if want_head:
            d_head = d_head + (h.T @ dz).astype(jnp.float32)
        return (total + jnp.sum(nll * wc), d_head), (d_h, nll)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(head.shape if want_head else (), jnp.float32))
    (total, d_head), (d_hidden, nll) = jax.lax.scan(one, init, (hidden, targets, w))
    return total, (d_hidden, d_head.astype(head.dtype) if want_head else None, nll)


def _chunked_bwd(chunk, softcap, res, g):
    d_hidden, d_head, nll = res
    if isinstance(g, SymbolicZero):
        return None, None, None, None
    return ((g * d_hidden).astype(d_hidden.dtype), None if d_head is None else (g * d_head).astype(d_head.dtype),
            None, g * nll)


_chunked.defvjp(_chunked_fwd, _chunked_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _whole(hidden, head, targets, w, softcap):
    """sum of w * token losses with the (N, V) logits whole: `plain_cross_entropy`'s value."""
    return jnp.sum(_nll_and_lse(_logits(hidden, head, softcap), targets)[0] * w)


def _whole_fwd(hidden, head, targets, w, softcap):
    """The loss, keeping for the backward the head's output before the cap (N, V, in hidden's
    dtype: what autodiff would keep too) and each row's log-sum-exp and loss."""
    want_head = head.perturbed
    hidden, head, targets, w = hidden.value, head.value, targets.value, w.value
    head_c = head.astype(hidden.dtype)
    raw = hidden @ head_c
    nll, lse = _nll_and_lse(_capped(raw, softcap), targets)
    return jnp.sum(nll * w), (hidden, head if want_head else None, head_c, targets, w, raw, lse, nll)


def _whole_bwd(softcap, res, g):
    hidden, head, head_c, targets, w, raw, lse, nll = res
    if isinstance(g, SymbolicZero):
        return None, None, None, None
    dz = _logits_grad(raw, targets, lse, g * w, softcap)
    d_head = None if head is None else (hidden.T @ dz).astype(head.dtype)
    return (dz @ head_c.T).astype(hidden.dtype), d_head, None, g * nll


_whole.defvjp(_whole_fwd, _whole_bwd, symbolic_zeros=True)


def chunked_cross_entropy(hidden: Float[Array, "N D"], head: Float[Array, "D V"], targets: Int[Array, " N"],
                          weights: Float[Array, " N"] | None, chunk: int | None, *,
                          softcap: float | None = None) -> tuple[Scalar, Scalar]:
    """(sum over tokens of weights * cross-entropy, sum of weights), both float32 scalars.

    - hidden: the final-normed features, one row per token, in the compute dtype.
    - head: the output projection (D, V) (the tied embedding's transpose works as is).
    - targets: int32 token ids; weights: per-token loss weights (None = all 1; 0 = masked).
    - chunk: rows per chunk; None = the logits whole (`plain_cross_entropy`'s arithmetic, its
      backward by hand).
    - softcap: Gemma 2's logit soft cap, applied to the logits before the softmax.
    Differentiable in hidden, head and weights; the mean loss is loss_sum / weight_sum.
    """
    w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    weight_sum = jnp.float32(hidden.shape[0]) if weights is None else jnp.sum(w)
    if chunk is None or chunk >= hidden.shape[0]:
        return _whole(hidden, head, targets, w, softcap), weight_sum
    h, t, wc = _chunks(hidden, targets, w, chunk)
    return _chunked(h, head, t, wc, chunk, softcap), weight_sum
