"""Weight storage for decoding: `Int8Linear.quantize(weight)`, `RowsLinear.store(weight, dtype)`.

Decoding one token reads every weight once, so its speed is bound by the bytes of the weights,
not by FLOPs. Both classes stand in a `Linear`'s place (same call, same `.weight`) and store
the weight transposed, (d_out, d_in), each output channel's weights contiguous, for
`linear.rows_matmul`: a decoded row is multiplied by each weight row and summed, which reads
the stored bytes once with the conversion to float32 fused into that pass (a dot on a
converted weight ran ~10x slower on XLA:CPU; see `rows_matmul`). Activations stay float32.

- `RowsLinear`: the weight in a float dtype (bfloat16: 8 significant bits, relative error
  <= 2^-9; float32: exact).
- `Int8Linear`: int8 with one float32 scale per output channel (symmetric, absmax / 127),
  applied after the sum: (x . q) * s = x . (q * s). Each weight is rounded to the nearest
  multiple of its channel's scale, an error of at most scale / 2 = absmax / 254.

Stacked weights (a leading `num_blocks` axis, as in `Transformer.blocks`) keep that axis in
front and get one scale per block and channel.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8, PRNGKeyArray

from .linear import rows_matmul

__all__ = ["Int8Linear", "RowsLinear", "quantize_int8"]


def quantize_int8(w: Float[Array, "*L d_in d_out"]) -> tuple[Int8[Array, "*L d_in d_out"], Float[Array, "*L d_out"]]:
    """Symmetric per-output-channel int8: (q, scale) with w ~ q * scale[..., None, :]."""
    w = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=-2)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale[..., None, :]), -127, 127).astype(jnp.int8)
    return q, scale


class RowsLinear(eqx.Module):
    """A `Linear` whose weight is stored transposed, (d_out, d_in), in any float dtype."""

    wt: Float[Array, "d_out d_in"]

    def __init__(self, wt: Float[Array, "*L d_out d_in"]):
        self.wt = wt

    @classmethod
    def store(cls, weight: Float[Array, "*L d_in d_out"], dtype: Any) -> RowsLinear:
        """From a (d_in, d_out) weight (a `Linear`'s, or a tied embedding's transpose)."""
        return cls(jnp.swapaxes(weight, -1, -2).astype(dtype))

    @property
    def weight(self) -> Float[Array, "d_in d_out"]:
        """The (d_in, d_out) float32 weight, for code that reads `.weight` (MLA's absorbed form)."""
        return jnp.swapaxes(self.wt, -1, -2).astype(jnp.float32)

    def __call__(self, x: Float[Array, "*lead d_in"], *, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "*lead d_out"]:
        return rows_matmul(x, self.wt)


class Int8Linear(eqx.Module):
    """A `Linear` whose weight is stored int8, transposed (d_out, d_in), with float32
    per-output-channel scales."""

    q: Int8[Array, "d_out d_in"]
    scale: Float[Array, " d_out"]

    def __init__(self, q: Int8[Array, "*L d_out d_in"], scale: Float[Array, "*L d_out"]):
        self.q, self.scale = q, scale

    @classmethod
    def quantize(cls, weight: Float[Array, "*L d_in d_out"]) -> Int8Linear:
        """From a float (d_in, d_out) weight (a `Linear`'s, or a tied embedding's transpose)."""
        q, scale = quantize_int8(weight)
        return cls(jnp.swapaxes(q, -1, -2), scale)

    @property
    def weight(self) -> Float[Array, "d_in d_out"]:
        """The dequantised float32 weight, for code that reads `.weight` (MLA's absorbed form)."""
        return jnp.swapaxes(self.q, -1, -2).astype(jnp.float32) * self.scale[..., None, :]

    def __call__(self, x: Float[Array, "*lead d_in"], *, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "*lead d_out"]:
        return rows_matmul(x, self.q, self.scale)
