"""Deep models train with one array per layer; everything outside the step keeps the stacks.

A scanned layer loop (`lax.scan` over the stacked blocks, `model.py`) costs XLA:CPU a copy of
each layer's weights into the loop body, and zero-filled stacks that the loop writes the saved
activations and the weights' gradients into one layer at a time. Held as a tuple of per-layer
Blocks (`model.unstack_blocks`), the same step reads and writes every layer's arrays in place:
SmolLM2-135M (30 blocks, batch 2 x 256, float32) 2688 -> 2454 ms for a LoRA step and 3448 ->
2841 ms for a full one, with bitwise equal losses (benchmarks/step_ab.py --variants
unroll1,unstacked; issue 25). It costs compile time (~17 -> ~23 s there), so it is used where the
auto rule (`scan_unroll: 0`) already rolls the loop: deeper than AUTO_UNROLL_MAX_BLOCKS.

The stacked form stays the run's format: checkpoints, LoRA surgery, sharding, `load` and
`generate` all see stacked blocks. The trainer unstacks the state once after start-up or
restore (`unstack_state`) and restacks what it saves (`restack_state`; the save briefly holds
both forms). Used on CPU, and only where the two forms compute the same update:
- data parallel (FSDP gathers one layer at a time inside the scan);
- no rematerialisation (its policies apply to the scanned body);
- element-wise optimizers (adamw, adam, lion): Muon names its groups by the stacked paths and
  adafactor factors a stacked (L, m, n) moment over other axes than a per-layer (m, n) one;
- no MoE (its per-layer balance losses and expert counts are read from the stacked loop).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ..config import Config
from ..model import Transformer, unstack_blocks
from .state import TrainState

__all__ = ["unstacked_training", "unstack_model", "restack_blocks", "unstack_state", "restack_state"]

ELEMENTWISE_OPTIMIZERS = ("adamw", "adam", "lion")


def unstacked_training(config: Config, backend: str | None = None) -> bool:
    """Whether a run with `config` trains with per-layer arrays (module docstring) on `backend`
    (default: JAX's). CPU only: that is where it was measured to pay, and elsewhere the copies
    that unstacking at start-up and restacking at each save make (2x the params and optimizer
    state for a moment) would cost accelerator memory that a large run may not have."""
    backend = jax.default_backend() if backend is None else backend
    return (backend == "cpu" and config.scan_unroll == 0 and config.effective_scan_unroll == 1
            and config.sharding == "dp" and config.effective_remat == "none"
            and config.optimizer in ELEMENTWISE_OPTIMIZERS and not config.use_moe)


def unstack_model(model: Transformer, trainable: Any = None, num_blocks: int | None = None
                  ) -> tuple[Transformer, Any]:
    """(`model`, its `trainable` mask or None) with one array per layer, for a step of your own:
    partition the result and pass the mask to `make_train_step` as usual; `restack_blocks`
    before saving in the stacked format. `num_blocks`: needed when `model` holds no arrays
    (the static part of a partitioned model); default: the arrays' leading size."""
    L = model.num_blocks if num_blocks is None else num_blocks
    return unstack_blocks(model, L), None if trainable is None else unstack_blocks(trainable, L)


def restack_blocks(model: Transformer) -> Transformer:
    """The inverse of `unstack_blocks`: a tuple of per-layer Blocks stacked back into one Block
    whose arrays have a leading layer axis. Idempotent; works on any pytree shaped like the
    model (params, optimizer moments, bool masks: non-array leaves are kept from layer 0)."""
    if not isinstance(model.blocks, tuple):
        return model
    dynamic = [eqx.partition(block, eqx.is_array)[0] for block in model.blocks]
    static = eqx.partition(model.blocks[0], eqx.is_array)[1]
    stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *dynamic)
    return eqx.tree_at(lambda m: m.blocks, model, eqx.combine(stacked, static))


def _each_model(f: Any, tree: Any) -> Any:
    """`tree` with `f` applied to every Transformer-shaped node (the params, and the moments
    and masks the optimizer state holds in the params' shape)."""
    is_model = lambda x: isinstance(x, Transformer)  # noqa: E731
    return jax.tree.map(lambda x: f(x) if is_model(x) else x, tree, is_leaf=is_model)


def unstack_state(state: TrainState, num_blocks: int) -> TrainState:
    """`state` with the params' and the optimizer state's blocks one array per layer."""
    unstack = lambda m: unstack_blocks(m, num_blocks)  # noqa: E731
    return state.replace(params=unstack(state.params), opt_state=_each_model(unstack, state.opt_state))


def restack_state(state: TrainState) -> TrainState:
    """`state` in the stacked form checkpoints hold (the inverse of `unstack_state`)."""
    return state.replace(params=restack_blocks(state.params), opt_state=_each_model(restack_blocks, state.opt_state))
