"""Weight storage for decoding: `Int8Linear.quantize(weight)`, `Bfloat16Linear.store(weight)`.

Decoding one token reads every weight once, so its speed is bound by the bytes of the weights,
not by FLOPs. Both classes stand in a `Linear`'s place (same call, same `.weight`) and keep its
(d_in, d_out) layout. Their matmuls run on the stored dtype itself, never on a float32 copy of
the weight: XLA:CPU hands a dot of two int8 (or two bfloat16) operands with at least two rows
to YNNPACK's kernels, which read the small weight once (int8: ~2x faster than the float32 dot
for SmolLM2-135M's 30 layers at one row, benchmarks/README.md), while a dot on a converted
weight runs as a column loop, ~10x slower. The float32 activations therefore go into the dot
as a short sum of rows of the weight's dtype that reproduces them to ~16 bits:

- `Int8Linear`: int8 weights with one float32 scale per output channel (symmetric, absmax /
  127): each weight is off by at most scale / 2 = absmax / 254. Each activation row x is split
  into two int8 rows with one scale each, x ~ s1 q1 + s2 q2 (q2 quantises what q1 left over),
  an error of at most max|x| / (2 * 127 * 254) ~ 1.6e-5 max|x| per element: the int32 dot of
  those rows with the weights is exact, and the scales are applied after it,
  (x . q) s = x . (q s).
- `Bfloat16Linear`: bfloat16 weights (8 significant bits, relative error <= 2^-9); each
  activation row is split into bfloat16 hi + lo (hi = bf16(x), lo = bf16(x - hi)): a relative
  error <= 2^-17; products of bfloat16 numbers are exact in the float32 accumulator.

Stacked weights (a leading `num_blocks` axis, as in `Transformer.blocks`) keep that axis in
front and get one scale per block and channel.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, BFloat16, Float, Int8, PRNGKeyArray

__all__ = ["Bfloat16Linear", "Int8Linear", "int8_matmul", "bfloat16_matmul", "quantize_int8",
           "split_int8", "split_bfloat16"]

INT8_MAX = 127.0


def _int8_scale(a: Float[Array, "..."], axis: int, keepdims: bool = False) -> Float[Array, "..."]:
    """Symmetric int8 scales along `axis`: absmax / 127 (1 where all values are 0)."""
    absmax = jnp.max(jnp.abs(a), axis=axis, keepdims=keepdims)
    return jnp.where(absmax > 0, absmax / INT8_MAX, 1.0)


def quantize_int8(w: Float[Array, "*L d_in d_out"]) -> tuple[Int8[Array, "*L d_in d_out"], Float[Array, "*L d_out"]]:
    """Symmetric per-output-channel int8: (q, scale) with w ~ q * scale[..., None, :]."""
    w = w.astype(jnp.float32)
    scale = _int8_scale(w, axis=-2)
    q = jnp.clip(jnp.round(w / scale[..., None, :]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def split_int8(rows: Float[Array, "R d"]) -> tuple[Int8[Array, "R2 d"], Float[Array, "R2 1"]]:
    """Each float32 row as two int8 rows (R2 = 2R) and their scales: rows ~ s[:R] q[:R] + s[R:] q[R:],
    within max|row| / (2 * 127 * 254) per element (the second row rounds what the first left)."""
    s1 = _int8_scale(rows, axis=-1, keepdims=True)
    q1 = jnp.clip(jnp.round(rows / s1), -INT8_MAX, INT8_MAX)
    rest = rows - q1 * s1
    s2 = _int8_scale(rest, axis=-1, keepdims=True)
    q2 = jnp.round(rest / s2)  # s2 is rest's own absmax / 127: no clip needed
    return jnp.concatenate([q1, q2]).astype(jnp.int8), jnp.concatenate([s1, s2])


def split_bfloat16(rows: Float[Array, "R d"]) -> BFloat16[Array, "R2 d"]:
    """Each float32 row as bfloat16 hi and lo rows (R2 = 2R): rows ~ hi + lo, within 2^-17 relative."""
    hi = rows.astype(jnp.bfloat16)
    lo = (rows - hi.astype(rows.dtype)).astype(jnp.bfloat16)
    return jnp.concatenate([hi, lo])


def _dot(a: Array, w: Array, out_dtype) -> Array:
    return jax.lax.dot_general(a, w, (((1,), (0,)), ((), ())), preferred_element_type=out_dtype)


def int8_matmul(x: Float[Array, "*lead d_in"], q: Int8[Array, "d_in d_out"],
                scale: Float[Array, " d_out"]) -> Float[Array, "*lead d_out"]:
    """x @ (q * scale) as one int8 x int8 -> int32 dot of `split_int8(x)`'s rows with q."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    xq, xs = split_int8(rows)
    acc = _dot(xq, q, jnp.int32).astype(jnp.float32) * xs
    n = rows.shape[0]
    y = (acc[:n] + acc[n:]) * scale
    return y.reshape(*x.shape[:-1], q.shape[-1]).astype(x.dtype)


def bfloat16_matmul(x: Float[Array, "*lead d_in"], w: BFloat16[Array, "d_in d_out"]
                    ) -> Float[Array, "*lead d_out"]:
    """x @ w as one bfloat16 x bfloat16 -> float32 dot of `split_bfloat16(x)`'s rows with w."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    acc = _dot(split_bfloat16(rows), w, jnp.float32)
    n = rows.shape[0]
    return (acc[:n] + acc[n:]).reshape(*x.shape[:-1], w.shape[-1]).astype(x.dtype)


class Bfloat16Linear(eqx.Module):
    """A `Linear` whose (d_in, d_out) weight is stored in bfloat16."""

    w: BFloat16[Array, "d_in d_out"]

    def __init__(self, w: BFloat16[Array, "*L d_in d_out"]):
        self.w = w

    @classmethod
    def store(cls, weight: Float[Array, "*L d_in d_out"]) -> Bfloat16Linear:
        """From a (d_in, d_out) weight (a `Linear`'s, or a tied embedding's transpose)."""
        return cls(weight.astype(jnp.bfloat16))

    @property
    def weight(self) -> Float[Array, "d_in d_out"]:
        """The float32 weight, for code that reads `.weight` (MLA's absorbed form)."""
        return self.w.astype(jnp.float32)

    def __call__(self, x: Float[Array, "*lead d_in"], *, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "*lead d_out"]:
        return bfloat16_matmul(x, self.w)


class Int8Linear(eqx.Module):
    """A `Linear` whose (d_in, d_out) weight is stored int8, with float32 per-output-channel
    scales."""

    q: Int8[Array, "d_in d_out"]
    scale: Float[Array, " d_out"]

    def __init__(self, q: Int8[Array, "*L d_in d_out"], scale: Float[Array, "*L d_out"]):
        self.q, self.scale = q, scale

    @classmethod
    def quantize(cls, weight: Float[Array, "*L d_in d_out"]) -> Int8Linear:
        """From a float (d_in, d_out) weight (a `Linear`'s, or a tied embedding's transpose)."""
        return cls(*quantize_int8(weight))

    @property
    def weight(self) -> Float[Array, "d_in d_out"]:
        """The dequantised float32 weight, for code that reads `.weight` (MLA's absorbed form)."""
        return self.q.astype(jnp.float32) * self.scale[..., None, :]

    def __call__(self, x: Float[Array, "*lead d_in"], *, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "*lead d_out"]:
        return int8_matmul(x, self.q, self.scale)
