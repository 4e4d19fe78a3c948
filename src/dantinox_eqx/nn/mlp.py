"""The position-wise MLP (SwiGLU or GELU) and GELU with a hand-written backward."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from .functional import fold_key
from .linear import Linear, add_bias

__all__ = ["MLP", "gelu", "activate"]


class MLP(eqx.Module):
    """Position-wise MLP of width expansion * dim: SwiGLU (gate and up in one GEMM) or GELU."""

    up: Linear
    down: Linear
    up_bias: Float[Array, " up"] | None  # with mlp_bias: (2F,) with SwiGLU ([gate | up]) or (F,)
    down_bias: Float[Array, " D"] | None
    swiglu: bool = eqx.field(static=True)
    activation: str = eqx.field(static=True)

    def __init__(self, dim: int, hidden: int, *, key: PRNGKeyArray, swiglu: bool = False,
                 activation: str = "gelu", out_std: float = 0.02, bias: bool = False):
        """D = `dim` -> `hidden` -> D; SwiGLU doubles `up` to [gate | up]; otherwise
        `activation` is "gelu" (tanh form, custom backward) or a `jax.nn` function name."""
        k1, k2 = jax.random.split(key)
        self.up = Linear(dim, (2 if swiglu else 1) * hidden, key=k1)
        self.down = Linear(hidden, dim, key=k2, std=out_std)
        self.up_bias = jnp.zeros(((2 if swiglu else 1) * hidden,)) if bias else None
        self.down_bias = jnp.zeros((dim,)) if bias else None
        self.swiglu, self.activation = swiglu, activation

    def __call__(self, x: Float[Array, "B T D"], *, key: PRNGKeyArray | None = None
                 ) -> tuple[Float[Array, "B T D"], Scalar]:
        """(y, 0.0): the MLP returns a balance loss like `MoE`. `key`: LoRA dropout in up/down."""
        h = activate(add_bias(self.up(x, key=fold_key(key, 1)), self.up_bias), self.swiglu, self.activation)
        return add_bias(self.down(h, key=fold_key(key, 2)), self.down_bias), jnp.zeros((), jnp.float32)


def activate(h: Array, swiglu: bool, activation: str) -> Array:
    """The MLP nonlinearity on `up`'s output: SwiGLU silu(gate) * up of h = [gate | up], else
    `activation` ("gelu": the custom-backward `gelu`; "relu2": relu(x)^2; else a `jax.nn`
    function name). Shared by
    the dense MLP and the MoE experts."""
    if swiglu:
        gate, h = jnp.split(h, 2, axis=-1)
        return jax.nn.silu(gate) * h
    if activation == "gelu":
        return gelu(h)
    if activation == "relu2":  # ReLU squared (modded-nanogpt)
        return jnp.square(jax.nn.relu(h))
    return getattr(jax.nn, activation)(h)


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
