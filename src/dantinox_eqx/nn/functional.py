"""Small stateless helpers shared by the layers: dropout, key splitting, dtype casts."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

__all__ = ["dropout", "keep_probability", "split_key", "fold_key", "cast_floating"]

_KEEP: contextvars.ContextVar[Any] = contextvars.ContextVar("dropout_keep_probability", default=None)


@contextlib.contextmanager
def keep_probability(keep: Any) -> Iterator[None]:
    """While tracing inside this context, every dropout whose (static) rate is nonzero keeps
    units with probability `keep` (a JAX scalar) instead of `1 - rate`. How a population
    (train/population.py) gives each vmapped member its own dropout rate in one program: the
    static rates still decide where dropout runs, `keep` how much."""
    token = _KEEP.set(keep)
    try:
        yield
    finally:
        _KEEP.reset(token)


def dropout(x: Array, rate: float, key: PRNGKeyArray | None) -> Array:
    """Inverted dropout; the identity when `rate == 0` or `key is None` (evaluation)."""
    if rate == 0.0 or key is None:
        return x
    keep_p = _KEEP.get()
    if keep_p is None:
        keep_p = 1.0 - rate
    keep = jax.random.bernoulli(key, keep_p, x.shape)
    return jnp.where(keep, x / keep_p, 0).astype(x.dtype)


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
