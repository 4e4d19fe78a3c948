"""LoRA: low-rank adapters added to a trained model by pytree surgery.

    model = apply_lora(base, targets="attention", rank=8, alpha=16.0, key=key)
    trainable = lora_trainable(model)               # True on the A and B factors only
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = init_opt_state(optimizer, params, trainable)
    step = make_train_step(static, optimizer, trainable=trainable)
    ...
    plain = merge_lora(model)                        # W + (alpha / r) A @ B, no adapters left

`apply_lora` returns a new `Transformer` in which the targeted `model.Linear`s of the stacked
blocks are `LoRALinear`s (targeted MoE `ExpertLinear`s: `LoRAExpertLinear`s); nothing else
changes, so generation, checkpoints and the training step work unchanged. Which Linears are
adapted is found generically, by walking the blocks:

- "attention": every `Linear` under `blocks.attn` (dense attention: the fused `qkv` and `o`;
  MLA: all of its projections).
- "mlp": every `Linear` under `blocks.mlp` (dense MLP: `up` and `down`), and with MoE every
  `moe.ExpertLinear` (the routed experts' `up` and `down`, one rank-r adapter per expert:
  `LoRAExpertLinear`) and a shared expert's Linears. An MoE router (a field named `router`)
  is never adapted: it routes tokens, adapting it changes which experts run.
- "all": both.

The embedding and the output head are never adapted.

On the fused `qkv` the adapter is one rank-r update of the whole (D, (H + 2K) E) matrix (as PEFT
does for GPT-2's fused `c_attn`), not three separate rank-r updates of Q, K and V.

Dropout on the LoRA path (`dropout > 0`) takes the `key=` of the call, as Equinox layers do:
every layer passes its sublayers their own keys (`nn.functional.fold_key`), so the training
forward `model(tokens, key=k)` reaches every adapter with a distinct key (per block and per
projection), and a call without a key (evaluation, generation) has no dropout.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from .config import ConfigError
from .model import Linear, dropout, matmul
from .nn.moe import ExpertLinear

__all__ = ["LoRALinear", "LoRAExpertLinear", "apply_lora", "lora_trainable", "merge_lora", "has_lora", "adapter_params",
           "load_adapter", "lora_summary", "TARGETS"]

TARGETS = {"attention": ("attn",), "mlp": ("mlp",), "all": ("attn", "mlp")}
NEVER_ADAPTED = frozenset({"router"})  # field names of Linears that no target selects
ADAPTER_FIELDS = ("lora_a", "lora_b")


class _Adapter(eqx.Module):
    """What LoRALinear and LoRAExpertLinear share: y = mm(x, W) + mm(scale * mm(dropout(x), A), B)
    with W frozen, scale = alpha / rank, A Kaiming-uniform and B zeros (a fresh adapter leaves the
    layer unchanged), the factors in the base weight's dtype. Subclasses say what `mm` is and
    which plain module `merged` returns."""

    weight: Float[Array, "*experts d_in d_out"]  # the frozen base weight (same name as the base's)
    lora_a: Float[Array, "*experts d_in r"]
    lora_b: Float[Array, "*experts r d_out"]
    scale: float = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    def __init__(self, base: Linear | ExpertLinear, rank: int, alpha: float = 16.0, dropout: float = 0.0, *,
                 key: PRNGKeyArray):
        self.weight = base.weight
        self.lora_a, self.lora_b = _init_factors(base.weight, rank, key)
        self.scale, self.dropout = alpha / rank, dropout

    @staticmethod
    def _mm(x: Array, w: Array) -> Array:
        raise NotImplementedError

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        """`key` enables dropout on the adapter's input (training); None: no dropout. The layer
        that holds the adapter passes it, as Equinox layers pass `key=` (nn/functional.fold_key)."""
        h = dropout(x, self.dropout, key)
        # scale applied to the (N, r) product, not the (N, d_out) one: one pass over r columns
        # instead of d_out (SmolLM2-135M LoRA step 0.968x, issue 25); for a power-of-two scale
        # (alpha / rank, e.g. 16 / 8) the result is bitwise the same
        return self._mm(x, self.weight) + self._mm(self.scale * self._mm(h, self.lora_a), self.lora_b)

    def merge_weights(self) -> Float[Array, "*stack d_in d_out"]:
        """W + scale * A @ B, computed in float32 and cast to W's dtype (works stacked too)."""
        return _merge(self.weight, self.lora_a, self.lora_b, self.scale)


class LoRALinear(_Adapter):
    """LoRA on a `Linear`: y = x @ W + scale * dropout(x) @ A @ B. Same call contract as
    `Linear`: any leading axes, flattened into one GEMM."""

    @staticmethod
    def _mm(x: Array, w: Array) -> Array:
        return matmul(x, w)

    def merged(self) -> Linear:
        """The plain `Linear` holding `merge_weights()`."""
        return jax.tree_util.tree_unflatten(_linear_treedef(), [self.merge_weights()])


class LoRAExpertLinear(_Adapter):
    """LoRA on the E stacked experts of an `ExpertLinear`: y[e] = x[e] @ W[e] + scale *
    dropout(x[e]) @ A[e] @ B[e], an independent rank-r adapter per expert; one dropout key for
    the whole (E, C, d_in) input. Same call contract as `ExpertLinear`."""

    @staticmethod
    def _mm(x: Array, w: Array) -> Array:
        return jnp.einsum("ecd,edf->ecf", x, w.astype(x.dtype))

    def merged(self) -> ExpertLinear:
        """The plain `ExpertLinear` holding `merge_weights()`."""
        return jax.tree_util.tree_unflatten(_expert_treedef(), [self.merge_weights()])


def _init_factors(weight: Array, rank: int, key: PRNGKeyArray) -> tuple[Array, Array]:
    """A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (PEFT's Kaiming-uniform) and B = 0, in `weight`'s
    dtype, for a weight (*lead, d_in, d_out): one independent adapter per leading index."""
    *lead, d_in, d_out = weight.shape
    bound = 1.0 / d_in**0.5
    a = jax.random.uniform(key, (*lead, d_in, rank), minval=-bound, maxval=bound).astype(weight.dtype)
    return a, jnp.zeros((*lead, rank, d_out), weight.dtype)


def _merge(weight: Array, a: Array, b: Array, scale: float) -> Array:
    """weight + scale * a @ b over any leading axes, in float32, cast back to weight's dtype."""
    f32 = jnp.float32
    delta = jnp.matmul(a.astype(f32), b.astype(f32))
    return (weight.astype(f32) + scale * delta).astype(weight.dtype)


@functools.cache
def _linear_treedef() -> Any:
    # A Linear's structure does not depend on its shape: one built once serves every merge.
    return jax.tree_util.tree_structure(Linear(1, 1, key=jax.random.key(0)))


@functools.cache
def _expert_treedef() -> Any:
    return jax.tree_util.tree_structure(ExpertLinear(1, 1, 1, key=jax.random.key(0)))


_ADAPTED = {Linear: LoRALinear, ExpertLinear: LoRAExpertLinear}  # base module -> its LoRA wrapper


# --------------------------------------------------------------------------- finding targets
def _is_lora(x: Any) -> bool:
    return isinstance(x, LoRALinear | LoRAExpertLinear)


def _get(node: Any, path: tuple) -> Any:
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            node = getattr(node, k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            node = node[k.idx]
        elif isinstance(k, jax.tree_util.DictKey):
            node = node[k.key]
        else:
            raise TypeError(f"unsupported pytree path entry {k!r}")
    return node


def _name(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _linears(tree: Any, prefix: tuple) -> list[tuple[tuple, Linear | ExpertLinear]]:
    """(path from `tree`, module) for every `model.Linear` and `moe.ExpertLinear` inside
    `tree.<prefix>`."""
    found = []
    sub = _get(tree, prefix)
    is_base = lambda x: type(x) in _ADAPTED
    leaves = jax.tree_util.tree_flatten_with_path(sub, is_leaf=is_base)[0]
    for path, node in leaves:
        if not is_base(node):
            continue
        names = {getattr(k, "name", None) for k in path}
        if names & NEVER_ADAPTED:
            continue
        found.append((prefix + tuple(path), node))
    return found


def has_lora(model: Any) -> bool:
    """True when `model` holds at least one `LoRALinear`."""
    return any(_is_lora(x) for x in jax.tree.leaves(model, is_leaf=_is_lora))


# --------------------------------------------------------------------------- surgery
def apply_lora(model: Any, targets: str = "attention", rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, *, key: PRNGKeyArray) -> Any:
    """A copy of `model` whose targeted block Linears are `LoRALinear`s (see the module doc).

    Each stacked Linear (num_blocks, d_in, d_out) becomes a stacked LoRALinear built with
    `eqx.filter_vmap` over per-layer keys: A (num_blocks, d_in, rank), B (num_blocks, rank,
    d_out). Raises ConfigError naming the field for: an unknown target or one that matches
    no Linear (lora_targets), rank <= 0 or rank > min(d_in, d_out) of an adapted layer
    (lora_rank), alpha <= 0 (lora_alpha), dropout outside [0, 1) (lora_dropout), a model that
    already has adapters (use_lora).
    """
    if targets not in TARGETS:
        raise ConfigError(f"lora_targets: unknown value {targets!r}; choose one of {', '.join(TARGETS)}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(f"lora_rank: must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ConfigError(f"lora_alpha: must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora_dropout: must be in [0, 1), got {dropout!r}")
    if has_lora(model):
        raise ConfigError("use_lora: the model already has LoRA adapters; merge_lora(model) first "
                          "to stack a new adapter on the merged weights")
    found = [hit for part in TARGETS[targets] for hit in _linears(model.blocks, (jax.tree_util.GetAttrKey(part),))]
    if not found:
        raise ConfigError(f"lora_targets: {targets!r} matches no Linear in this model's blocks; "
                          f"choose one of {', '.join(TARGETS)} that the model has (only model.Linear and "
                          f"moe.ExpertLinear fields are adapted, MoE routers never)")
    for path, lin in found:
        d_in, d_out = lin.weight.shape[-2:]
        if rank > min(d_in, d_out):
            raise ConfigError(f"lora_rank: {rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} of "
                              f"blocks.{_name(path)} (weight {d_in} x {d_out}); use lora_rank <= "
                              f"{min(d_in, d_out)}")
    n_blocks = found[0][1].weight.shape[0]
    make = eqx.filter_vmap(lambda lin, k: _ADAPTED[type(lin)](lin, rank, alpha, dropout, key=k))
    adapted = [make(lin, jax.random.split(k, n_blocks))
               for (_, lin), k in zip(found, jax.random.split(key, len(found)))]
    paths = [path for path, _ in found]
    return eqx.tree_at(lambda m: [_get(m.blocks, p) for p in paths], model, adapted)


def merge_lora(model: Any) -> Any:
    """A plain model: every LoRALinear replaced by a Linear holding W + scale * A @ B."""
    return jax.tree.map(lambda x: x.merged() if _is_lora(x) else x, model, is_leaf=_is_lora)


# --------------------------------------------------------------------------- filters and adapters
def lora_trainable(model: Any) -> PyTree[bool]:
    """A bool pytree shaped like `eqx.partition(model, eqx.is_array)[0]`: True on the LoRA
    factors (`lora_a`, `lora_b`), False on every other array. Pass it as `trainable` to
    `make_train_step` and `init_opt_state`."""
    params = eqx.filter(model, eqx.is_array)

    def is_adapter(path: tuple, _: Any) -> bool:
        return getattr(path[-1], "name", None) in ADAPTER_FIELDS if path else False

    return jax.tree_util.tree_map_with_path(is_adapter, params)


def adapter_params(model: Any) -> PyTree:
    """Only the LoRA factors: `model`'s array part with every other leaf None. Save it with
    `checkpoint.save` for an adapter-only checkpoint ({"blocks.attn.qkv.lora_a": ...})."""
    return eqx.filter(eqx.filter(model, eqx.is_array), lora_trainable(model))


def load_adapter(model: Any, adapter: PyTree) -> Any:
    """`model` (already passed through `apply_lora` with the same targets and rank) with its
    LoRA factors replaced by those of `adapter` (as returned by `adapter_params`).

    Raises ConfigError when the adapter does not fit: other targets (lora_targets) or other
    shapes (lora_rank)."""
    if not has_lora(model):
        raise ConfigError("use_lora: load_adapter needs a model with LoRA adapters; call apply_lora first")
    mine = adapter_params(model)
    theirs = jax.tree_util.tree_flatten_with_path(adapter)[0]
    ours = jax.tree_util.tree_flatten_with_path(mine)[0]
    if [_name(p) for p, _ in theirs] != [_name(p) for p, _ in ours]:
        raise ConfigError(
            f"lora_targets: the adapter holds {sorted(_name(p) for p, _ in theirs)} but the model's "
            f"adapters are {sorted(_name(p) for p, _ in ours)}; use the targets the adapter was trained with")
    for (path, a), (_, b) in zip(theirs, ours):
        if tuple(a.shape) != tuple(b.shape):
            raise ConfigError(f"lora_rank: adapter array {_name(path)} has shape {tuple(a.shape)}, the "
                              f"model expects {tuple(b.shape)}; use the rank the adapter was trained with")
    leaves = [a.astype(b.dtype) for (_, a), (_, b) in zip(theirs, ours)]
    params, static = eqx.partition(model, eqx.is_array)
    frozen = eqx.filter(params, lora_trainable(model), inverse=True)
    new = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(mine), leaves)
    return eqx.combine(new, frozen, static)


def lora_summary(model: Any) -> dict[str, int | float]:
    """{"trainable": LoRA parameters, "total": all parameters of the adapted model (base +
    adapters), "percent": 100 * trainable / total}.

    Also counts an abstract model (`eqx.filter_eval_shape(apply_lora, ...)`), so the share of a
    large model needs no memory."""

    def is_param(x: Any) -> bool:
        return (eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)) and not jax.dtypes.issubdtype(
            x.dtype, jax.dtypes.prng_key)

    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(model, is_param))[0]
    total = sum(math.prod(x.shape) for _, x in leaves)
    trainable = sum(math.prod(x.shape) for p, x in leaves if getattr(p[-1], "name", None) in ADAPTER_FIELDS)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total if total else 0.0}
