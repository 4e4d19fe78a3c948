"""How a model's weights are stored for generation: `store_weights(model, "float32|bfloat16|int8")`.

Decoding reads every weight once per token (a 135M-parameter model: 540 MB in float32), so
smaller weights decode faster. Only storage changes; activations, norms, the KV cache and the
softmax stay float32:
- bfloat16: every `Linear` weight (and the output head) stored bfloat16, converted to float32
  where the matmul reads it (`matmul` casts the weight to the activations' dtype). Each weight
  is rounded to 8 significant bits: relative error <= 2^-9 = 0.2 %.
- int8: every `Linear` replaced by `nn.quant.Int8Linear` (int8, one float32 scale per output
  channel): error <= absmax / 254 per column.
The embedding table stays float32 (one row is read per token). A tied head (`weight_tying`)
gets a stored copy of the embedding's transpose as the model's `head`, since the head is read
whole every token. MoE experts (`ExpertLinear`) stay float32.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..config import ConfigError
from ..model import Transformer
from ..nn.linear import Linear
from ..nn.quant import Int8Linear

__all__ = ["WEIGHTS", "store_weights"]

WEIGHTS = ("float32", "bfloat16", "int8")


def _bfloat16(w: Float[Array, "*L d_in d_out"]) -> Linear:
    return Linear(*w.shape[-2:], key=None, weight=w.astype(jnp.bfloat16))


def store_weights(model: Transformer, weights: str) -> Transformer:
    """`model` with its projection weights stored as `weights` (see the module docstring)."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights: unknown value {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if weights == "float32":
        return model
    convert = _bfloat16 if weights == "bfloat16" else Int8Linear.quantize
    is_linear = lambda x: isinstance(x, Linear)
    model = jax.tree.map(lambda x: convert(x.weight) if is_linear(x) else x, model, is_leaf=is_linear)
    if model.head is None:  # tied: the head is the embedding, read whole every token
        model = eqx.tree_at(lambda m: m.head, model, convert(model.embedding.T), is_leaf=lambda x: x is None)
    return model
