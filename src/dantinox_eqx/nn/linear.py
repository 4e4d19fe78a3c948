"""`Linear`: y = x @ weight, no bias, weights stored (d_in, d_out).

Modules take a batch `(B, T, ...)` (a deliberate departure from "modules take one example",
STYLE.md section 2): every `Linear` flattens the leading axes into one matmul. On XLA:CPU the
vmapped form computes weight gradients as B batched matmuls and a reduction, which made the
backward 5x the forward; the flat form is one GEMM (step 80 -> 60 ms).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

__all__ = ["Linear", "matmul", "add_bias", "normal_init"]


class Linear(eqx.Module):
    """y = x @ weight (no bias). Any leading axes; they are flattened into one GEMM."""

    weight: Float[Array, "d_in d_out"]

    def __init__(self, d_in: int, d_out: int, *, key: PRNGKeyArray | None, std: float = 0.02,
                 dtype: Any = jnp.float32, weight: Float[Array, "*L d_in d_out"] | None = None):
        """Random N(0, std) weights from `key`, or the given `weight` (key None; stacked too), as is."""
        self.weight = normal_init(key, (d_in, d_out), std).astype(dtype) if weight is None else weight

    def __call__(self, x: Float[Array, "*lead d_in"], *, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "*lead d_out"]:
        """`key` is unused (a plain Linear has no randomness); it is accepted so that a LoRA
        adapter, whose dropout takes it, can stand in any Linear's place."""
        return matmul(x, self.weight)


def matmul(x: Float[Array, "*lead d_in"], w: Float[Array, "d_in d_out"]) -> Float[Array, "*lead d_out"]:
    """x @ w with the leading axes flattened into one GEMM (see the module docstring)."""
    y = x.reshape(-1, x.shape[-1]) @ w.astype(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def add_bias(y: Float[Array, "*lead d"], bias: Float[Array, " d"] | None) -> Float[Array, "*lead d"]:
    """y + bias (in y's dtype), or y itself without a bias. Biases live beside a `Linear`, not in
    it, so LoRA merging, its filters and the weight-decay mask (by the name `weight`) see only
    weights (config.qkv_bias / o_bias / mlp_bias, for imported Hugging Face models)."""
    return y if bias is None else y + bias.astype(y.dtype)


def normal_init(key: PRNGKeyArray, shape: tuple[int, ...], std: float) -> Float[Array, "..."]:
    """std * N(0, 1) samples. The barrier keeps XLA from folding `std` into the sampler's own
    constants when this runs inside a jit (`Transformer.build`): the arrays are then bitwise
    the eager ones (folded, a quarter of them differ in the last bit)."""
    return std * jax.lax.optimization_barrier(jax.random.normal(key, shape))
