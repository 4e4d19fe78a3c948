"""How a model's weights are stored for generation: `store_weights(model, "float32|bfloat16|int8")`.

Decoding reads every weight once per token (a 135M-parameter model: 540 MB in float32), so
smaller weights decode faster. Only storage changes; activations, norms, the KV cache and the
softmax stay float32:
- float32: every `Linear` becomes `nn.quant.RowsLinear` with the same float32 values, stored
  transposed (exact: only the order of the float32 sums changes).
- bfloat16: `RowsLinear` in bfloat16, converted to float32 where the matmul reads it. Each
  weight is rounded to 8 significant bits: relative error <= 2^-9 = 0.2 %.
- int8: every `Linear` replaced by `nn.quant.Int8Linear` (int8, one float32 scale per output
  channel): error <= absmax / 254 per column.
The embedding table stays float32 (one row is read per token). A tied head (`weight_tying`)
gets the embedding as the model's `head` (float32: the same array, no copy; otherwise a
stored copy), since the head is read whole every token. MoE experts (`ExpertLinear`) stay
float32. The blocks are unstacked (`model.unstack_blocks`): one Block per layer, so the
decode loop reads each layer's weights in place instead of copying slices of the stacks.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ..config import ConfigError
from ..model import Transformer, unstack_blocks
from ..nn.linear import Linear
from ..nn.quant import Int8Linear, RowsLinear

__all__ = ["WEIGHTS", "store_weights"]

WEIGHTS = ("float32", "bfloat16", "int8")


def _convert(weights: str):
    if weights == "int8":
        return Int8Linear.quantize
    dtype = jnp.float32 if weights == "float32" else jnp.bfloat16
    return lambda w: RowsLinear.store(w, dtype)


def store_weights(model: Transformer, weights: str) -> Transformer:
    """`model` with its projection weights stored as `weights` and its blocks unstacked, for
    decoding (see the module docstring). Not for training: LoRA, sharding and checkpoints expect
    stacked `Linear`s."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights: unknown value {weights!r}; choose one of {', '.join(WEIGHTS)}")
    convert = _convert(weights)
    is_linear = lambda x: isinstance(x, Linear)
    model = jax.tree.map(lambda x: convert(x.weight) if is_linear(x) else x, model, is_leaf=is_linear)
    if model.head is None:  # tied: the head is the embedding, read whole every token
        head = RowsLinear(model.embedding) if weights == "float32" else convert(model.embedding.T)
        model = eqx.tree_at(lambda m: m.head, model, head, is_leaf=lambda x: x is None)
    return unstack_blocks(model)
