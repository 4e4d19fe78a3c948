"""Small stateless helpers shared by the layers: dropout, key splitting, dtype casts."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

__all__ = ["dropout", "split_key", "fold_key", "cast_floating"]


def dropout(x: Array, rate: float, key: PRNGKeyArray | None) -> Array:
    """Inverted dropout; the identity when `rate == 0` or `key is None` (evaluation)."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_key(key: PRNGKeyArray | None, n: int) -> list[PRNGKeyArray | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast every floating-point array leaf of `tree` to `dtype` (e.g. for use_bf16)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating) else x,
        tree,
    )


def fold_key(key: PRNGKeyArray | None, i: int) -> PRNGKeyArray | None:
    """`jax.random.fold_in(key, i)`, or None without a key (evaluation): how a layer hands its
    sublayers their own keys (LoRA dropout inside a projection) without touching its own."""
    return None if key is None else jax.random.fold_in(key, i)
