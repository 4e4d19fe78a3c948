"""`TrainState`: everything a training run carries from one step to the next, as one Module.

    state = TrainState.initial(params, opt_state, key=jax.random.key(seed))
    state.params, state.opt_state          arrays (placed on the mesh)
    state.step                             optimizer updates done (a host int)
    state.key                              the root PRNG key (equal to key(seed))
    state.best_val_loss, state.best_step   the best evaluation so far
    state.evals_without_improvement        early-stopping counter

The step function changes `params` and `opt_state`; the hooks change the counters (they are host
values, so reading them never waits on the device). On disk (`checkpoint_tree`) the state keeps
the format every run since the first has written: params in `params`, the rest in
`train_state` = {opt_state, step, key, best_val_loss, best_step, evals_without_improvement}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray, PyTree

from ..parallel import sharding

__all__ = ["TrainState", "host_key"]


def host_key(key: Any) -> Any:
    """A process-local copy of a PRNG key (a restored one is replicated over the mesh, which may
    span other processes' devices: jit cannot close over such an array)."""
    return jax.random.wrap_key_data(np.asarray(jax.random.key_data(key)), impl=jax.random.key_impl(key))


class TrainState(eqx.Module):
    params: PyTree
    opt_state: PyTree
    key: PRNGKeyArray
    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = 0
    evals_without_improvement: int = 0

    @classmethod
    def initial(cls, params: PyTree, opt_state: PyTree, *, key: PRNGKeyArray) -> TrainState:
        return cls(params=params, opt_state=opt_state, key=key)

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)

    # -- the on-disk form (run/checkpoint.py saves and restores these trees)
    def checkpoint_tree(self, mesh: Any) -> dict[str, Any]:
        """The `train_state` tree: the optimizer state as placed, the scalars and the key
        replicated on `mesh` (every process holds them, as the collective save needs)."""
        return {"opt_state": self.opt_state, **sharding.replicate(
            {"step": jnp.asarray(self.step, jnp.int32), "key": self.key,
             "best_val_loss": jnp.asarray(self.best_val_loss, jnp.float32),
             "best_step": jnp.asarray(self.best_step, jnp.int32),
             "evals_without_improvement": jnp.asarray(self.evals_without_improvement, jnp.int32)}, mesh)}

    @classmethod
    def from_checkpoint(cls, params: PyTree, tree: dict[str, Any]) -> TrainState:
        """The state restored from a `train_state` tree (see `checkpoint_tree`)."""
        return cls(params=params, opt_state=tree["opt_state"], key=host_key(tree["key"]),
                   step=int(tree["step"]), best_val_loss=float(tree["best_val_loss"]),
                   best_step=int(tree["best_step"]),
                   evals_without_improvement=int(tree["evals_without_improvement"]))
