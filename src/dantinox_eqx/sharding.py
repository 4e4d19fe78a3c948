"""Device meshes and shardings (data parallel; FSDP arrives with the multi-device issue).

Built on `jax.sharding.Mesh` and `NamedSharding` with one mesh axis, "data": batches are split
along it, parameters are replicated, and XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["DATA", "make_mesh", "replicate", "shard_batch", "num_devices"]

DATA = "data"


def make_mesh(n_devices: int = 0) -> Mesh:
    """A 1-D mesh over the first `n_devices` devices (0 = all of them)."""
    devices = jax.devices()
    if n_devices < 0 or n_devices > len(devices):
        raise ValueError(f"n_devices: asked for {n_devices}, but {len(devices)} device(s) are visible")
    n = n_devices or len(devices)
    return Mesh(np.asarray(devices[:n]), (DATA,))


def num_devices(mesh: Mesh) -> int:
    return int(mesh.devices.size)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of `tree` whole on every device of `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    return NamedSharding(mesh, P(*([None] * batch_axis), DATA))


def shard_batch(x: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """Split `x` (or every array of a pytree) along `batch_axis` over the "data" axis."""
    return jax.device_put(x, batch_sharding(mesh, batch_axis))
