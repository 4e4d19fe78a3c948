"""Device meshes, shardings and multi-process start-up (layer 2: imports `config` only).

The seed's sharding names are here: `make_mesh`, `replicate`, `shard_batch`, `num_devices`.
"""

from .sharding import make_mesh, num_devices, replicate, shard_batch

__all__ = ["make_mesh", "num_devices", "replicate", "shard_batch"]
