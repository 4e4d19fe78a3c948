"""Multi-process (multi-host) training with JAX's own multi-controller runtime.

Every process runs the same program. `initialize` connects them (`jax.distributed.initialize`);
after it, `jax.devices()` lists every process's devices, so `sharding.make_mesh` builds one
global mesh and the jitted steps run as one SPMD program across hosts (XLA inserts the
cross-host collectives: NCCL on GPUs, gloo on CPUs).

- Each process loads its share of the data: `sample_global_batch` derives the same global
  window starts from the step key in every process, but materialises only the rows that live on
  its own devices (`global_batch` does the same for any row source).
- Only the primary process (`is_primary()`) writes the run directory, logs and W&B.
- Checkpoints are collective: every process calls `checkpoint.save`/`checkpoint.restore`, and
  orbax writes each array's shards from the process that holds them.

    distributed.initialize()                 # reads JAX_COORDINATOR_ADDRESS etc. (no-op if unset)
    mesh = sharding.make_mesh(0, batch_size=config.batch_size)
    batch = distributed.sample_global_batch(train_tokens, key, mesh, batch_size, seq_len, accum)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Int, Integer, PRNGKeyArray

from ..config import ConfigError
from .sharding import BATCH_AXIS, batch_sharding, num_devices

__all__ = ["initialize", "is_primary", "process_count", "barrier", "broadcast_int", "any_process", "global_batch",
           "sample_global_batch", "local_rows"]

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> bool:
    """Join a multi-process JAX job; call before anything touches a device.

    Arguments fall back to the environment variables JAX_COORDINATOR_ADDRESS (HOST:PORT of
    process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID. With none of them set this is a no-op
    (single process) and returns False; otherwise all three are required, and it returns True.

    CPU collectives use gloo (`jax_cpu_collectives_implementation`; jax 0.10.2's default,
    set explicitly so a changed default cannot silently leave CPU processes unconnected).
    `timeout_s` bounds the wait for the other processes to join.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if all(v is None for v in given.values()):
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ConfigError(f"{missing[0]}: multi-process training needs coordinator, num_processes "
                          f"and process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    if ":" not in coordinator:
        raise ConfigError(f"coordinator: expected HOST:PORT (process 0's address), got {coordinator!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"process_id: {process_id} must be in [0, num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
    return True


def is_primary() -> bool:
    """True in process 0 (the one that writes the run directory, logs and W&B)."""
    return jax.process_index() == 0


def process_count() -> int:
    return jax.process_count()


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op with one process). E.g. all
    processes check the run directory, then the primary creates it after `barrier("checked")`."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_int(value: int) -> int:
    """Process 0's `value` in every process (e.g. the timestamp of an auto-named run directory,
    which could differ by a second between hosts). The identity with one process."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def any_process(flag: bool) -> bool:
    """True in every process when `flag` is True in at least one (e.g. a stop signal received
    by one host, or the primary failing to start its W&B run): a collective, so every process
    must call it at the same point. The identity with one process."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def local_rows(mesh: Mesh, n_rows: int) -> list[slice]:
    """The slices of a global batch of `n_rows` rows held by this process's devices (in order)."""
    sharding = batch_sharding(mesh, 0)
    slices = {idx[0].indices(n_rows)[:2] for idx in sharding.addressable_devices_indices_map((n_rows,)).values()}
    return [slice(a, b) for a, b in sorted(slices)]


def global_batch(source: np.ndarray | Callable[[tuple[slice, ...]], Any], mesh: Mesh, *,
                 shape: tuple[int, ...] | None = None, batch_axis: int = BATCH_AXIS) -> Array:
    """A global jax.Array split on `batch_axis` over the mesh, built from this process's rows.

    - source: a host array holding the whole global batch (every process passes the same one),
      or a function `rows(index) -> block` that returns the block at `index` (a tuple of slices
      into the global shape) and is called only for blocks on this process's devices, so a
      process loads only its own share (then `shape`, the global shape, is required).
    Single-process it is equivalent to `sharding.shard_batch(source, mesh, batch_axis)`.
    """
    if callable(source):
        if shape is None:
            raise ValueError("global_batch: pass shape= (the global batch shape) with a row function")
        fetch = lambda index: np.asarray(source(index))
    else:
        host = np.asarray(source)
        shape = host.shape
        fetch = lambda index: host[index]
    if shape[batch_axis] % num_devices(mesh):
        raise ConfigError(f"batch_size: {shape[batch_axis]} rows do not split over {num_devices(mesh)} devices")
    return jax.make_array_from_callback(tuple(shape), batch_sharding(mesh, batch_axis), fetch)


def sample_global_batch(tokens: Integer[np.ndarray, " n"], key: PRNGKeyArray, mesh: Mesh, batch_size: int,
                        seq_len: int, accum: int = 1) -> Int[Array, "accum batch window"]:
    """`data.sample_batch(tokens, key, batch_size, seq_len, accum)`, as a global array split on
    the batch axis, where this process reads only the windows of its own rows.

    Every process draws the same window starts from `key` (the draw is identical to
    sample_batch's, so results match the single-process run bit for bit) and gathers the
    tokens of its rows from its host copy of `tokens` (a numpy array or memory map).
    """
    starts = np.asarray(jax.random.randint(key, (accum, batch_size), 0, tokens.shape[0] - seq_len))
    offsets = np.arange(seq_len + 1)

    def rows(index: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(tokens[starts[index[:2]][..., None] + offsets]).astype(np.int32)

    return global_batch(rows, mesh, shape=(accum, batch_size, seq_len + 1), batch_axis=BATCH_AXIS)
