"""How a model's weights are stored for generation: `store_weights(model, "float32|bfloat16|int8")`.

Decoding reads every weight once per token (a 135M-parameter model: 540 MB in float32), so
smaller weights decode faster. Only storage changes; activations, norms, the KV cache and the
softmax stay float32:
- float32: the weights as they are (`Linear`, a plain dot).
- bfloat16: every `Linear` replaced by `nn.quant.Bfloat16Linear`. Each weight is rounded to 8
  significant bits: relative error <= 2^-9 = 0.2 %.
- int8: every `Linear` replaced by `nn.quant.Int8Linear` (int8, one float32 scale per output
  channel): error <= absmax / 254 per column. The fastest on CPU (half of float32's time per
  token for SmolLM2-135M, benchmarks/README.md).
Both run their matmuls on the stored dtype (the float32 activations enter as two rows of it that
reproduce them to ~16 bits: `nn/quant.py`), so the logits move by the weights' rounding only.
The embedding table stays float32 (one row is read per token). With bfloat16 / int8 a tied
head (`weight_tying`) gets a stored copy of the embedding as the model's `head`, since the
head is read whole every token. MoE experts (`ExpertLinear`) stay
float32. The blocks are unstacked (`model.unstack_blocks`): one Block per layer, so the
decode loop reads each layer's weights in place instead of copying slices of the stacks.
"""

from __future__ import annotations

import equinox as eqx
import jax

from ..config import ConfigError
from ..model import Transformer, unstack_blocks
from ..nn.linear import Linear
from ..nn.quant import Bfloat16Linear, Int8Linear

__all__ = ["WEIGHTS", "store_weights"]

WEIGHTS = ("float32", "bfloat16", "int8")


def _convert(weights: str):
    return Int8Linear.quantize if weights == "int8" else Bfloat16Linear.store


def store_weights(model: Transformer, weights: str) -> Transformer:
    """`model` with its projection weights stored as `weights` and its blocks unstacked, for
    decoding (see the module docstring). Not for training: LoRA, sharding and checkpoints expect
    stacked `Linear`s."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights: unknown value {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if weights == "float32":
        return unstack_blocks(model)
    convert = _convert(weights)
    is_linear = lambda x: isinstance(x, Linear)
    model = jax.tree.map(lambda x: convert(x.weight) if is_linear(x) else x, model, is_leaf=is_linear)
    if model.head is None:  # tied: the head is the embedding, read whole every token
        model = eqx.tree_at(lambda m: m.head, model, convert(model.embedding.T), is_leaf=lambda x: x is None)
    return unstack_blocks(model)
