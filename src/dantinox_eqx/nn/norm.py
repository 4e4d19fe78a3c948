"""`Norm`: RMSNorm or LayerNorm over the last axis, computed in float32."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["Norm"]


class Norm(eqx.Module):
    """RMSNorm (or LayerNorm), computed in float32 and cast back to the input dtype."""

    scale: Float[Array, " dim"]
    bias: Float[Array, " dim"] | None
    kind: str = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, kind: str = "rmsnorm", eps: float = 1e-6):
        self.scale = jnp.ones((dim,))
        self.bias = jnp.zeros((dim,)) if kind == "layernorm" else None
        self.kind, self.eps = kind, eps

    def __call__(self, x: Float[Array, "*lead dim"]) -> Float[Array, "*lead dim"]:
        h = x.astype(jnp.float32)
        if self.kind == "layernorm":
            h = h - h.mean(-1, keepdims=True)
        h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + self.eps)
        h = h * self.scale.astype(jnp.float32)
        if self.bias is not None:
            h = h + self.bias.astype(jnp.float32)
        return h.astype(x.dtype)
