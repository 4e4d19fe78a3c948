"""Device meshes and shardings: data parallel ("dp") and fully sharded data parallel ("fsdp").

One mesh axis, "data". Batches of shape (grad_accum, batch, seq + 1) are split along the batch
axis (axis 1); XLA's SPMD partitioner inserts the gradient all-reduce. Parameters are

- dp:   replicated on every device;
- fsdp: each array split along "data" on its largest dimension divisible by the device count
        (replicated when none divides). Stacked block arrays are never split on their leading
        layer axis, so the `lax.scan` over blocks slices one (sharded) layer per iteration and
        XLA all-gathers that layer inside the loop: per-device parameter and optimizer memory
        falls as 1/n_devices, plus one gathered layer at a time.

Optimizer-state leaves follow the sharding of the parameter they mirror (Adam moments are
pytrees shaped like the parameters); scalars (step counts) are replicated.

    mesh = make_mesh(config.n_devices, batch_size=config.batch_size)
    params, opt_state = place(params, opt_state, mesh, config.sharding)
    step = shard_train_step(make_train_step(static, optimizer), mesh, params, opt_state)
    params, opt_state, metrics = step(params, opt_state, shard_batch(batch, mesh, 1), key)

Everything here works unchanged under multi-process JAX (`distributed.initialize`): the mesh
spans every process's devices; build batches with `distributed.global_batch`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, PyTree

from ..config import ConfigError

__all__ = ["DATA", "MODES", "make_mesh", "put", "replicate", "shard_batch", "batch_sharding", "num_devices",
           "fsdp_spec", "param_sharding", "state_sharding", "place", "bytes_per_device",
           "shard_train_step", "shard_eval_step"]

DATA = "data"
MODES = ("dp", "fsdp")
BATCH_AXIS = 1  # of (grad_accum, batch, seq + 1) training batches and (n, batch, seq + 1) eval ones


# --------------------------------------------------------------------------- mesh
def make_mesh(n_devices: int = 0, *, batch_size: int | None = None) -> Mesh:
    """A 1-D mesh named "data" over the first `n_devices` devices (0 = all of them).

    Under multi-process JAX the devices are the global ones (every process's). With
    `batch_size`, checks that it splits evenly over the mesh (Config checks this only when
    n_devices > 0, since 0 resolves here) and raises ConfigError naming batch_size.
    """
    devices = jax.devices()
    if n_devices < 0 or n_devices > len(devices):
        raise ConfigError(f"n_devices: asked for {n_devices}, but {len(devices)} device(s) are visible; "
                          f"use 0 (all) or a number up to {len(devices)}")
    n = n_devices or len(devices)
    if jax.process_count() > 1 and n != len(devices):
        raise ConfigError(f"n_devices: {n_devices} with {jax.process_count()} processes; multi-process "
                          f"training uses every device of every process: set n_devices to 0 or {len(devices)}")
    if batch_size is not None and batch_size % n:
        raise ConfigError(f"batch_size: {batch_size} is not divisible by the {n} device(s) in use "
                          f"(n_devices={n_devices}); use a multiple of {n} or set n_devices")
    return Mesh(np.asarray(devices[:n]), (DATA,))


def num_devices(mesh: Mesh) -> int:
    return int(mesh.devices.size)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def put(tree: Any, shardings: Any) -> Any:
    """`jax.device_put(tree, shardings)` (one sharding or a matching pytree of them) that also
    places typed PRNG keys on meshes spanning several processes (device_put refuses those;
    their raw key data is placed and re-wrapped). Every process must pass the same values."""
    leaves, treedef = jax.tree.flatten(tree)
    shards = treedef.flatten_up_to(shardings) if not isinstance(shardings, jax.sharding.Sharding) \
        else [shardings] * len(leaves)
    out = []
    for x, s in zip(leaves, shards):
        if _is_key(x) and not s.is_fully_addressable:
            x = jax.random.wrap_key_data(jax.device_put(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
        else:
            x = jax.device_put(x, s)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of `tree` whole on every device of `mesh`."""
    return put(tree, NamedSharding(mesh, P()))


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    return NamedSharding(mesh, P(*([None] * batch_axis), DATA))


def shard_batch(x: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """Split `x` (or every array of a pytree) along `batch_axis` over the "data" axis.

    Single-process only (every process would need the whole batch): under multi-process JAX
    use `distributed.global_batch`, which materialises only this process's rows.
    """
    return jax.device_put(x, batch_sharding(mesh, batch_axis))


# --------------------------------------------------------------------------- parameters
def fsdp_spec(shape: tuple[int, ...], n: int, stacked: bool = False) -> P:
    """The FSDP PartitionSpec of an array of `shape` over `n` devices.

    Splits the largest dimension divisible by `n` (the earliest on ties); replicated (P())
    when none divides or n == 1. `stacked` arrays (leading layer axis) never split axis 0.
    """
    if n <= 1:
        return P()
    first = 1 if stacked else 0
    candidates = [(size, -axis) for axis, size in enumerate(shape) if axis >= first and size % n == 0]
    if not candidates:
        return P()
    axis = -max(candidates)[1]
    return P(*([None] * axis), DATA)


def _is_stacked(path: tuple) -> bool:
    # Stacked block arrays live under the model's `blocks` field (model.Transformer).
    return any(isinstance(k, jax.tree_util.GetAttrKey) and k.name == "blocks" for k in path)


def _leaf_sharding(path: tuple, leaf: Any, mesh: Mesh, mode: str) -> NamedSharding:
    if mode not in MODES:
        raise ConfigError(f"sharding: {mode!r} is not one of {MODES}")
    shape = tuple(np.shape(leaf))
    if mode == "dp" or not shape:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, fsdp_spec(shape, num_devices(mesh), _is_stacked(path)))


def param_sharding(params: PyTree, mesh: Mesh, mode: str = "dp") -> PyTree:
    """A pytree like `params` of NamedSharding: replicated ("dp") or FSDP ("fsdp", see fsdp_spec)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: _leaf_sharding(p, x, mesh, mode), params)


def state_sharding(opt_state: PyTree, mesh: Mesh, mode: str = "dp") -> PyTree:
    """Shardings for an optimizer state: every leaf shaped like a parameter gets that parameter's
    sharding (optax moments keep the parameters' attribute paths, e.g. `[0].mu.blocks.mlp.up.weight`,
    and FSDP's rule depends only on the shape and on lying under `blocks`); scalars are replicated."""
    return param_sharding(opt_state, mesh, mode)


def place(params: PyTree, opt_state: PyTree, mesh: Mesh, mode: str = "dp") -> tuple[PyTree, PyTree]:
    """Put `params` and `opt_state` on `mesh`: replicated ("dp") or sharded ("fsdp").

    Under multi-process JAX every process must pass the same values (same init key, or the same
    restored checkpoint); each keeps only its own devices' shards.
    """
    params = put(params, param_sharding(params, mesh, mode))
    opt_state = put(opt_state, state_sharding(opt_state, mesh, mode))
    return params, opt_state


def bytes_per_device(tree: PyTree) -> dict[str, int]:
    """Bytes that the arrays of `tree` occupy on each of this process's devices, measured from
    their shardings (the shapes of the addressable shards): {"max", "min", "total", "devices"}."""
    per: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        for shard in leaf.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + int(np.prod(shard.data.shape)) * leaf.dtype.itemsize
    values = list(per.values()) or [0]
    return {"max": max(values), "min": min(values), "total": sum(values), "devices": len(per)}


# --------------------------------------------------------------------------- inside the model
def _regather_policy(prim: Any, *_: Any, **__: Any) -> bool:
    # Save every residual except sharding-constraint outputs: those are the gathered weights of
    # `constrain_layer` (and re-constrained activations, whose inputs are saved anyway).
    return prim.name != "sharding_constraint"


# Remat policy for the scanned block under a mesh. Without it, autodiff would keep each layer's
# gathered (full) weights as residuals for the backward, stacking the whole model on every
# device and undoing FSDP; with it, the backward gathers each layer again (as FSDP does).
GATHERED_NOT_SAVED = _regather_policy


def layers_gathered() -> bool:
    """True while tracing under a mesh whose "data" axis is automatic (see `constrain_layer`);
    False without a mesh and inside `shard_map` (where "data" is manual: arrays are local)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and DATA in mesh.axis_names and DATA in mesh.auto_axes


def constrain_layer(layer: PyTree, h: Array) -> tuple[PyTree, Array]:
    """Called by the model on each block inside its `lax.scan`: when a mesh with a "data" axis
    is in context (`jax.set_mesh`, as the wrapped steps below do), gather this layer's
    parameters whole and keep the activations `h` (B, T, D) split on the batch.

    Why: left alone, XLA's partitioner sees weights split on "data" and may instead all-gather
    the *activations* and compute with split weights (tensor-parallel style), which moves the
    whole batch between devices. These two constraints pin the FSDP schedule: one all-gather of
    one layer's weights per scan iteration, in the forward and again in the backward, and a
    reduce-scatter of its gradient. Under data parallelism the parameters are already
    replicated, so only the activation constraint remains. A no-op without a mesh (one device,
    generation).
    """
    if not layers_gathered():
        return layer, h
    layer = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, P()), layer)
    if h.shape[0] % jax.sharding.get_abstract_mesh().shape[DATA] == 0:
        h = jax.lax.with_sharding_constraint(h, P(DATA))
    return layer, h


# --------------------------------------------------------------------------- steps
def _with_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """Call `fn` with `mesh` in context, so that `constrain_layer` sees it while tracing (the
    mesh is part of jit's cache key, so a trace without it is never reused)."""

    def call(*args):
        with jax.set_mesh(mesh):
            return fn(*args)

    call.lower = lambda *args: _lower(fn, mesh, *args)
    return call


def _lower(fn: Callable, mesh: Mesh, *args: Any) -> Any:
    with jax.set_mesh(mesh):
        return fn.lower(*args)


def _shardings_of(tree: PyTree) -> PyTree:
    """The sharding of every array of `tree` (leaves that already are shardings are kept)."""
    return jax.tree.map(lambda x: x if isinstance(x, jax.sharding.Sharding) else x.sharding, tree)


def shard_train_step(step: Callable, mesh: Mesh, params: PyTree, opt_state: PyTree, *,
                     donate: bool = True, data_shardings: tuple | None = None) -> Callable:
    """Wrap `step(params, opt_state, batch, key)` (from step.make_train_step) so that it keeps
    `params`/`opt_state` in the shardings they have now (from `place`; or pass pytrees of
    shardings, e.g. `param_sharding(...)`), takes the batch split on its batch axis (axis 1),
    runs with `mesh` in context (FSDP's per-layer gathers, see `constrain_layer`) and returns
    replicated metrics (readable by every process).

    `data_shardings`: the shardings of the arguments after (params, opt_state), default
    (batch split on axis 1, key replicated). The Trainer's fused step
    `step(params, opt_state, tokens, step_number)`, which samples its batch inside the
    compiled call, passes (replicated, replicated).

    Committed inputs must already have these shardings (jit raises on a mismatch rather than
    move data silently); host arrays and uncommitted ones (e.g. `jax.random.key(0)`) are placed.

    Without pinned output shardings XLA may hand back parameters in another layout than it was
    given (then every step would recompile or reshard); the gradient all-reduce (dp) or
    reduce-scatter (fsdp) is inserted by XLA from these shardings.
    """
    p_sh, o_sh = _shardings_of(params), _shardings_of(opt_state)
    rep = NamedSharding(mesh, P())
    data = tuple(data_shardings) if data_shardings is not None else (batch_sharding(mesh, BATCH_AXIS), rep)
    jitted = jax.jit(step, in_shardings=(p_sh, o_sh, *data), out_shardings=(p_sh, o_sh, rep),
                     donate_argnums=(0, 1) if donate else ())
    return _with_mesh(jitted, mesh)


def shard_eval_step(eval_step: Callable, mesh: Mesh, params: PyTree, *,
                    data_shardings: tuple | None = None) -> Callable:
    """Wrap `eval_step(params, batches (n, batch, seq + 1))` (step.make_eval_step): batches split
    on axis 1, every output replicated. `data_shardings`: the shardings of the arguments after
    `params` (default: the batches split on axis 1), as for `shard_train_step`."""
    rep = NamedSharding(mesh, P())
    data = tuple(data_shardings) if data_shardings is not None else (batch_sharding(mesh, BATCH_AXIS),)
    jitted = jax.jit(eval_step, in_shardings=(_shardings_of(params), *data), out_shardings=rep)
    return _with_mesh(jitted, mesh)
