"""Muon on the blocks' matrices, AdamW on everything else (`optimizer: muon`).

For a matrix W (d_in, d_out) of a block, applied as y = x @ W, at step t (1-based) with
gradient G_t and momentum beta = muon_momentum (`optax.contrib.scale_by_muon`, nesterov):

    M_t = beta M_{t-1} + (1 - beta) G_t
    N_t = beta M_t / (1 - beta^(t+1)) + (1 - beta) G_t / (1 - beta^t)       (bias-corrected)
    X_0 = N_t / (||N_t||_F + 1e-8);  X_{i+1} = a X_i + (b A + c A A) X_i,  A = X_i X_i^T
          five times, (a, b, c) = (3.4445, -4.7750, 2.0315), on the wide orientation
          (transposed first when d_in > d_out)                              (Newton-Schulz)
    W <- W - muon_lr(t) * (sqrt(max(1, d_out / d_in)) X_5 + muon_weight_decay * W)

`muon_lr(t)` is the run's schedule scaled to peak at `muon_lr`. Every other array (token and
position embeddings, the output head, norms, the MoE router) is trained by AdamW with `lr`,
`beta1`, `beta2` and `weight_decay` on its `weight` matrices, as `optimizer: adamw` would.

Which arrays are Muon's (`muon_labels`): every `weight` under `blocks` (dense `Linear`s and
MoE `ExpertLinear`s) except the MoE `router` (a D x n_experts map whose few columns decide
routing: it stays on AdamW), restricted to `blocks.attn` or `blocks.mlp` by `muon_params`.
With LoRA only the adapters train, and their factors `lora_a` (d_in, r) and `lora_b` (r, d_out)
are matrices too: they are Muon's (each orthogonalised on its own), so `optimizer: muon` trains
an adapter the way it trains a model.

Orthogonalisation is per matrix, never per stacked array: blocks are stored stacked,
(num_blocks, d_in, d_out) and MoE experts (num_blocks, n_experts, d_in, d_out), so the
dimension numbers say the matrix is the last two axes and every leading axis is a batch axis
(optax vmaps Newton-Schulz over them). Fused projections are split first, so that each
projection is orthogonalised on its own as in modded-nanogpt: the attention's `qkv` into q
(H E columns), k and v (K E each), a SwiGLU `up` into gate and value (F each). A LoRA
adapter's `lora_b` on `qkv` is one rank-r update of the fused matrix and stays whole.

`param_groups` lists the groups for model_summary.json.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PyTree
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from ..config import Config, ConfigError

__all__ = ["MUON", "ADAMW", "MATRIX_DIMS", "muon_labels", "fused_splits", "scale_by_block_muon",
           "param_groups"]

MUON, ADAMW = "muon", "adamw"  # the group labels
MATRIX_DIMS = MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)  # leading axes: batch
_PART_OF = {"blocks": None, "attention": "attn", "mlp": "mlp"}  # muon_params -> block field
_MUON_FIELDS = ("weight", "lora_a", "lora_b")
_NEVER = frozenset({"router"})


def _names(path: tuple) -> list[str]:
    return [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]


def _is_muon(path: tuple, leaf: Any, muon_params: str) -> bool:
    names = _names(path)
    if len(names) < 2 or names[0] != "blocks" or names[-1] not in _MUON_FIELDS or _NEVER & set(names):
        return False
    part = _PART_OF[muon_params]
    return (part is None or names[1] == part) and getattr(leaf, "ndim", 0) >= 2


def muon_labels(params: PyTree, muon_params: str = "blocks") -> PyTree[str]:
    """"muon" or "adamw" for every array leaf of `params` (None leaves, e.g. frozen by a
    `trainable` filter, stay None). ConfigError naming muon_params when Muon would get nothing
    (e.g. `muon_params: attention` while LoRA trains only MLP adapters)."""
    if muon_params not in _PART_OF:
        raise ConfigError(f"muon_params: unknown value {muon_params!r}; choose one of {', '.join(_PART_OF)}")
    labels = jax.tree_util.tree_map_with_path(
        lambda p, x: MUON if _is_muon(p, x, muon_params) else ADAMW, params)
    if MUON not in jax.tree.leaves(labels):
        raise ConfigError(f"muon_params: {muon_params!r} selects no trainable matrix of this model (with "
                          "LoRA only the adapters train: pick the part lora_targets adapts), so Muon would "
                          "train nothing; choose another muon_params or optimizer: adamw")
    return labels


# --------------------------------------------------------------------------- fused projections
class _Parts(eqx.Module):
    """A fused matrix split along its output axis (only inside the Muon transform)."""

    arrays: tuple[Array, ...]


def fused_splits(config: Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{field-path suffix: output widths} of the fused projections of `config`'s blocks:
    attention `qkv` -> (H E, K E, K E); with SwiGLU every `up` (MLP, MoE experts, shared
    expert) -> (F, F). MLA's projections are not fused this way and are left whole."""
    splits: dict[tuple[str, ...], tuple[int, ...]] = {}
    if not config.mla:
        H, K, E = config.n_heads, config.effective_kv_heads, config.head_size
        splits[("attn", "qkv", "weight")] = (H * E, K * E, K * E)
    if config.use_swiglu:
        F = config.expansion * config.dim
        splits[("up", "weight")] = (F, F)
    return splits


def _split_fused(tree: PyTree, splits: dict[tuple[str, ...], tuple[int, ...]]) -> PyTree:
    def split(path: tuple, x: Any) -> Any:
        names = tuple(_names(path))
        for suffix, widths in splits.items():
            if names[-len(suffix):] == suffix and names[0] == "blocks":
                if x.shape[-1] != sum(widths):
                    raise ValueError(f"{'.'.join(names)}: width {x.shape[-1]} is not {' + '.join(map(str, widths))}")
                cuts = [sum(widths[:i]) for i in range(1, len(widths))]
                return _Parts(tuple(jnp.split(x, cuts, axis=-1)))
        return x

    return jax.tree_util.tree_map_with_path(split, tree)


def _merge_fused(tree: PyTree) -> PyTree:
    is_parts = lambda x: isinstance(x, _Parts)
    return jax.tree.map(lambda x: jnp.concatenate(x.arrays, axis=-1) if is_parts(x) else x, tree, is_leaf=is_parts)


# --------------------------------------------------------------------------- the transform
def _width_scale(update: Array) -> Array:
    """Keller Jordan's width scaling: sqrt(max(1, d_out / d_in)) of each (d_in, d_out) matrix."""
    d_in, d_out = update.shape[-2:]
    return update * math.sqrt(max(1.0, d_out / d_in))


def scale_by_block_muon(splits: dict[tuple[str, ...], tuple[int, ...]] | None = None,
                        momentum: float = 0.95, mu_dtype: Any = None) -> optax.GradientTransformation:
    """Muon's direction (module docstring: N_t orthogonalised, width-scaled) for a tree of
    matrices whose last two axes are (d_in, d_out) and leading axes are batch (the block
    stack, experts); the fused projections named by `splits` (`fused_splits`) are split,
    orthogonalised per part and put back together. No learning rate or weight decay: chain
    them after. Leaves may be optax MaskedNodes (inside `optax.partition`)."""
    splits = splits or {}
    dims: Callable[[PyTree], PyTree] = lambda tree: jax.tree.map(lambda _: MATRIX_DIMS, tree)
    inner = optax.chain(
        scale_by_muon(beta=momentum, mu_dtype=mu_dtype, nesterov=True, weight_dimension_numbers=dims),
        optax.stateless(lambda updates, _: jax.tree.map(_width_scale, updates)),
    )

    def init(params: PyTree) -> Any:
        return inner.init(_split_fused(params, splits))

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, Any]:
        view = None if params is None else _split_fused(params, splits)
        updates, state = inner.update(_split_fused(updates, splits), state, view)
        return _merge_fused(updates), state

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- reporting
def param_groups(config: Config, params: PyTree, trainable: PyTree | None = None) -> dict[str, Any]:
    """model_summary.json's `optimizer_groups` for `optimizer: muon` ({} otherwise): per
    group its peak lr and its arrays, Muon's with the matrices each is orthogonalised as
    ("4 x 128x128" = 4 independent 128 x 128 matrices; fused projections listed per part)."""
    if config.optimizer != MUON:
        return {}
    trained = params if trainable is None else eqx.filter(params, trainable)
    labels = muon_labels(trained, config.muon_params)
    splits = fused_splits(config)
    muon: dict[str, str] = {}
    adamw: list[str] = []
    flat_labels = jax.tree_util.tree_flatten_with_path(labels)[0]
    for (path, label), x in zip(flat_labels, jax.tree.leaves(trained)):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if label == ADAMW:
            adamw.append(name)
            continue
        *batch, d_in, d_out = x.shape
        names = tuple(_names(path))
        widths = next((w for s, w in splits.items() if names[-len(s):] == s), (d_out,))
        shapes = ", ".join(f"{d_in}x{w}" for w in widths)
        muon[name] = f"{math.prod(batch)} x " + (f"({shapes})" if len(widths) > 1 else shapes)
    return {"optimizer_groups": {
        MUON: {"lr": config.muon_lr, "momentum": config.muon_momentum,
               "weight_decay": config.muon_weight_decay, "params": muon},
        ADAMW: {"lr": config.lr, "weight_decay": config.weight_decay, "params": adamw},
    }}
