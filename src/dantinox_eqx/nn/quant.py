"""Weight-only int8 storage of a `Linear`, for decoding: `Int8Linear.quantize(linear)`.

Decoding one token reads every weight once, so its speed is bound by the bytes of the weights,
not by FLOPs. `Int8Linear` stores a `Linear`'s (d_in, d_out) weight as int8 with one float32
scale per output channel (symmetric, absmax / 127); activations stay float32 and the matmul runs
in float32 on the weights converted where they are read (`x @ q`, then `* scale`, which is
exact algebra: (x @ q) * s = x @ (q * s)), so XLA can fuse the int8 -> float32 conversion into
the matmul's operand instead of writing a float32 copy of the weights.

Precision: each weight is rounded to the nearest multiple of its column's scale, an error of
at most scale / 2 = absmax / 254 (0.4 % of the column's largest weight). Stacked weights (a
leading `num_blocks` axis, as in `Transformer.blocks`) get one scale per block and channel.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8, PRNGKeyArray

__all__ = ["Int8Linear", "quantize_int8"]


def quantize_int8(w: Float[Array, "*L d_in d_out"]) -> tuple[Int8[Array, "*L d_in d_out"], Float[Array, "*L d_out"]]:
    """Symmetric per-output-channel int8: (q, scale) with w ~ q * scale[..., None, :]."""
    w = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=-2)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale[..., None, :]), -127, 127).astype(jnp.int8)
    return q, scale


class Int8Linear(eqx.Module):
    """A `Linear` whose weight is stored int8 with float32 per-output-channel scales."""

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
        y = x.reshape(-1, x.shape[-1]) @ self.q.astype(x.dtype)  # one flat GEMM, as `linear.matmul`
        return (y * self.scale.astype(x.dtype)).reshape(*x.shape[:-1], y.shape[-1])
