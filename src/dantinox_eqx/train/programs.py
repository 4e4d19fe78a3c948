"""The compiled programs of a `fit`: the sharded train step and evaluation, with batch sampling
fused in (one dispatch per step; the batch never exists on the host).

    step_fn(params, opt_state, step) -> (params, opt_state, metrics)
    evaluate(params, step) -> (train metrics, val metrics, params finite, MoE expert counts)

Everything random is a pure function of the root key and the step number s:

    init, data, dropout, eval = split(root, 4)
    batch of update s    = sample_batch(train, fold_in(data, s), batch_size, max_context, grad_accum)
    dropout of update s  = fold_in(dropout, s)
    eval after s updates = eval_iters batches of each split from fold_in(eval, s)

The corpus is placed whole on every device, from host numpy (every process holds the same ids);
each device then gathers only the windows of its own batch rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import Config
from ..data.sampling import Dataset, sample_batch
from ..parallel import sharding
from .expert_log import make_counts_fn
from .hooks import all_finite
from .step import make_eval_step, make_train_step

__all__ = ["build_programs"]


def build_programs(config: Config, static: Any, optimizer: Any, trainable: Any, dataset: Dataset,
                   mesh: Any, root: Any, params: Any, opt_state: Any) -> tuple[Callable, Callable]:
    """(step_fn, evaluate) for arrays placed like `params`/`opt_state` (see the module docstring).
    The sharded wrappers donate nothing, keep params and optimizer state in their placement and
    run with the mesh in context."""
    c = config
    _, data_key, dropout_key, eval_key = jax.random.split(root, 4)
    train_tokens = sharding.replicate(np.asarray(dataset.train), mesh)
    val_tokens = sharding.replicate(np.asarray(dataset.val), mesh)
    batch_sharding = sharding.batch_sharding(mesh, 1)  # (accum, batch, seq+1) split on the batch
    B, T = c.batch_size, c.max_context
    # use_bf16 + master_weights: float32 params, bfloat16 compute (see make_train_step).
    compute = jnp.bfloat16 if c.use_bf16 and c.master_weights else None
    step_fn = make_train_step(static, optimizer, alpha_balance=c.alpha_balance, trainable=trainable,
                              donate=False, compute_dtype=compute)
    eval_fn = make_eval_step(static, alpha_balance=c.alpha_balance, compute_dtype=compute)
    counts_fn = make_counts_fn(static) if c.use_moe else None  # MoE: expert_counts.csv

    def train_step(params, opt_state, tokens, step):
        batch = sample_batch(tokens, jax.random.fold_in(data_key, step), B, T, accum=c.grad_accum)
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return step_fn(params, opt_state, batch, jax.random.fold_in(dropout_key, step))

    def evaluate(params, train, val, step):
        k_train, k_val = jax.random.split(jax.random.fold_in(eval_key, step))
        batches = [jax.lax.with_sharding_constraint(sample_batch(tokens, k, B, T, accum=c.eval_iters),
                                                    batch_sharding)
                   for tokens, k in ((train, k_train), (val, k_val))]
        counts = None if counts_fn is None else counts_fn(params, batches[1])
        return eval_fn(params, batches[0]), eval_fn(params, batches[1]), all_finite(params), counts

    rep = NamedSharding(mesh, P())
    sharded_step = sharding.shard_train_step(train_step, mesh, params, opt_state, data_shardings=(rep, rep))
    sharded_eval = sharding.shard_eval_step(evaluate, mesh, params, data_shardings=(rep, rep, rep))
    return (lambda p, o, step: sharded_step(p, o, train_tokens, step),
            lambda p, step: sharded_eval(p, train_tokens, val_tokens, step))
