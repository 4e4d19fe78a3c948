"""Checkpoints: orbax-checkpoint directories of plain arrays, no pickle.

Layout inside a run directory:

    checkpoints/latest/<step>/params        model arrays
    checkpoints/latest/<step>/train_state   optimizer state, step, PRNG key (full resume)
    checkpoints/best/<step>/params          the weights with the best val_loss so far

Each `<step>` directory is committed atomically by orbax (written under a temporary name,
then renamed; `commit_success.txt` marks completion) and the previous one is deleted only after
the new one is complete, so an interrupted save never corrupts the last good checkpoint.

Pytrees are stored as flat mappings `{"blocks.attn.qkv.weight": array, ...}` keyed by their
attribute paths, which makes the format readable without this library and independent of the
Python classes. Restoring needs a `like` tree (e.g. a freshly built model's arrays, or their
`jax.ShapeDtypeStruct`s) that gives the structure, dtypes and, optionally, target shardings:
a checkpoint written on 4 devices restores on 1 and vice versa.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import PyTree

from .layout import CHECKPOINTS_DIR

__all__ = ["LATEST", "BEST", "CheckpointError", "flatten", "unflatten", "save", "restore",
           "latest_step", "checkpoint_dir"]

LATEST, BEST = "latest", "best"


class CheckpointError(ValueError):
    """No checkpoint where one was expected, or one whose arrays do not fit the model."""


def checkpoint_dir(run_dir: str | os.PathLike, which: str) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / which


def _name(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def flatten(tree: PyTree) -> dict[str, Any]:
    """`{attribute.path: array}` for every array leaf; typed PRNG keys become their raw data."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[_name(path) or "value"] = jax.random.key_data(leaf) if _is_key(leaf) else leaf
    return flat


def _abstract(x: Any) -> Any:
    if _is_key(x):
        x = jax.eval_shape(jax.random.key_data, x)
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)


def unflatten(flat: dict[str, Any], like: PyTree) -> PyTree:
    """Inverse of `flatten`, shaped like `like` (typed keys are re-wrapped)."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, ref in leaves_with_path:
        value = flat[_name(path) or "value"]
        leaves.append(jax.random.wrap_key_data(value, impl=jax.random.key_impl(ref)) if _is_key(ref) else value)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _manager(run_dir: str | os.PathLike, which: str, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(checkpoint_dir(run_dir, which).absolute(), options=options)


def save(run_dir: str | os.PathLike, which: str, step: int, params: PyTree,
         train_state: PyTree | None = None) -> None:
    """Save `params` (and, for full resume, `train_state`) as checkpoint `which` at `step`.

    Collective under multi-process JAX: every process calls it, orbax coordinates the writes.
    """
    items = {"params": ocp.args.StandardSave(flatten(params))}
    if train_state is not None:
        items["train_state"] = ocp.args.StandardSave(flatten(train_state))
    with _manager(run_dir, which, create=True) as mngr:
        if step in mngr.all_steps():
            # A resume saving again the step a kill interrupted (the best checkpoint saved, the
            # latest not): orbax refuses an existing step, and the resumed values are the same.
            mngr.delete(step)
        mngr.save(step, args=ocp.args.Composite(**items), force=True)
        mngr.wait_until_finished()


def latest_step(run_dir: str | os.PathLike, which: str) -> int | None:
    """The step of checkpoint `which` in `run_dir`, or None when there is none."""
    if not checkpoint_dir(run_dir, which).is_dir():
        return None
    with _manager(run_dir, which, create=False) as mngr:
        return mngr.latest_step()


def restore(run_dir: str | os.PathLike, which: str, params_like: PyTree,
            train_state_like: PyTree | None = None) -> tuple[int, PyTree, PyTree | None]:
    """Restore checkpoint `which`: returns (step, params, train_state or None).

    `params_like` / `train_state_like` give structure, dtypes and target shardings. A
    checkpoint whose names or shapes do not match raises CheckpointError.
    """
    step = latest_step(run_dir, which)
    if step is None:
        raise CheckpointError(f"no {which!r} checkpoint in {str(run_dir)!r}")
    items = {"params": ocp.args.StandardRestore(jax.tree.map(_abstract, flatten(params_like)))}
    if train_state_like is not None:
        items["train_state"] = ocp.args.StandardRestore(
            jax.tree.map(_abstract, flatten(train_state_like)))
    try:
        with _manager(run_dir, which, create=False) as mngr:
            restored = mngr.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(
            f"the {which!r} checkpoint in {str(run_dir)!r} does not fit this model: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    _check_shapes(restored["params"], flatten(params_like), run_dir)
    params = unflatten(restored["params"], params_like)
    state = unflatten(restored["train_state"], train_state_like) if train_state_like is not None else None
    return step, params, state


def _check_shapes(restored: dict[str, Any], expected: dict[str, Any], run_dir: Any) -> None:
    for name, ref in expected.items():
        got = restored.get(name)
        if got is None or tuple(got.shape) != tuple(np.shape(ref)):
            raise CheckpointError(
                f"checkpoint in {str(run_dir)!r}: array {name!r} has shape "
                f"{None if got is None else tuple(got.shape)}, the model expects {tuple(np.shape(ref))}"
            )
