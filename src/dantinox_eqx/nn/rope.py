"""Positions: rotary embeddings (rotate-half form over the whole head) and sinusoids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

__all__ = ["rope_base", "rope", "rotary_tables", "sinusoidal"]


def rope_base(head_dim: int, scale_factor: float = 1.0, base: float = 10000.0) -> float:
    """NTK-aware scaling: base * s^(d / (d - 2)) stretches the longest wavelengths by ~s while
    leaving the shortest ones nearly untouched (s = 1 gives the plain base)."""
    if scale_factor == 1.0:
        return base
    return base * scale_factor ** (head_dim / (head_dim - 2))


def rope(x: Float[Array, "*lead T n E"], positions: Int[Array, "*pb T"], base: float
         ) -> Float[Array, "*lead T n E"]:
    """Rotary embedding (rotate-half form) at absolute `positions`; float32 inside."""
    cos, sin = rotary_tables(positions, x.shape[-1] // 2, base)
    return _rotate(x, cos[..., None, :], sin[..., None, :])


def rotary_tables(positions: Int[Array, "*pb T"], half: int, base: float
                  ) -> tuple[Float[Array, "*pb T half"], Float[Array, "*pb T half"]]:
    """cos and sin of positions * base^(-i / half), i < half, in float32.

    Positions known when the program is traced (a full forward's 0..T-1: `model.features`
    makes them concrete) give tables computed here with NumPy, which the program holds as
    constants. Computed in the program, XLA:CPU recomputes cos and sin inside every fusion that
    reads them, once per element of q and k: ~1 ms of each layer's 2 x 256 x 9 x 64 queries at
    SmolLM2-135M's size, where reading the constants takes 0.1 (issue 25). The two agree to a
    few float32 ulps (the angle is rounded to float32 in both; the host's cos is float64's).
    """
    if not isinstance(positions, jax.core.Tracer):
        inv_freq = (1.0 / float(base) ** (np.arange(half) / half)).astype(np.float32)
        angles = (np.asarray(positions, np.float32)[..., None] * inv_freq).astype(np.float64)
        return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    inv_freq = 1.0 / base ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (*pb, T, half)
    return jnp.cos(angles), jnp.sin(angles)


@jax.custom_vjp
def _rotate(x: Array, cos: Array, sin: Array) -> Array:
    """Each (first half, second half) pair of x's last axis rotated by the angle of (cos, sin)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _rotate_fwd(x, cos, sin):
    return _rotate(x, cos, sin), (cos, sin)


def _rotate_bwd(res, g):
    """A rotation's transpose is the rotation back: one pass over g. Autodiff wrote each half's
    gradient zero-padded to the full width, then summed them (three passes over a q-sized
    array per layer, ~3 % of SmolLM2-135M's LoRA step; issue 25). The angles come from integer
    positions: no gradient."""
    cos, sin = res
    return _rotate(g, cos, -sin), None, None


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


def sinusoidal(positions: Int[Array, "*lead T"], dim: int) -> Float[Array, "*lead T dim"]:
    cos, sin = rotary_tables(positions, dim // 2, 10000.0)  # the same frequencies as RoPE's
    return jnp.concatenate([sin, cos], axis=-1)
