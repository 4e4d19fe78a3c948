"""The compiled programs of a `fit`: the sharded train step and evaluation, fed by a batch feed.

    step_fn(params, opt_state, step) -> (params, opt_state, metrics)
    evaluate(params, step) -> (train metrics, val metrics, params finite, MoE expert counts)

Everything random is a pure function of the root key and the step number s:

    init, data, dropout, eval = run_keys(root) = split(root, 4)
    batch of update s    = the feed's windows for (data, s) (fused: sample_batch(train, fold_in(data, s)))
    dropout of update s  = fold_in(dropout, s)
    eval after s updates = eval_iters batches of each split from fold_in(eval, s)

The feed (data/feeds.py) makes the batches. "fused": the corpus is placed whole on every device
and sampling is fused into the compiled step and evaluation (one dispatch per step; the batch
never exists on the host). "host": each process reads its own rows of each batch from the token
shards, placed ahead of the step by a background thread (device memory O(batch)). Either way the
batch of step s is a pure function of the root key and s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import Config, ConfigError
from ..data.feeds import make_feed
from ..data.tokenizer import eot_id
from ..data.tokens import Splits
from ..parallel import sharding
from .expert_log import make_counts_fn
from .hooks import all_finite
from .step import make_eval_step, make_train_step

__all__ = ["run_keys", "build_programs", "document_separator"]


def run_keys(root: Any) -> tuple[Any, Any, Any, Any]:
    """(init, data, dropout, eval): the keys a run of root key `root` (= key(seed)) derives,
    the one protocol of `fit`, a population member (train/population.py) and the LR finder."""
    init, data, dropout, evaluation = jax.random.split(root, 4)
    return init, data, dropout, evaluation



def document_separator(config: Config, dataset: Any) -> int | None:
    """The end-of-text id that cuts plain windows into documents with `document_mask` (None
    without it; chat data carries its own example boundaries). `dataset`: `tokens.Splits` or a
    `prepare_data` Dataset (its tokenizer)."""
    if not config.document_mask or getattr(dataset, "train_flags", None) is not None:
        return None
    eot = eot_id(dataset.tokenizer)
    if eot is None:
        raise ConfigError("document_mask: the tokenizer has no end-of-text token to separate documents; "
                          "set document_mask: false, or use a tokenizer with <|endoftext|>")
    return eot


def build_programs(config: Config, static: Any, optimizer: Any, trainable: Any, dataset: Splits, feed_kind: str,
                   mesh: Any, root: Any, params: Any, opt_state: Any) -> tuple[Callable, Callable, Any]:
    """(step_fn, evaluate, feed) for arrays placed like `params`/`opt_state` (see the module
    docstring). The feed (`data/feeds.py`: "fused" or "host") makes the batches; call its
    `start(step, total)` before the first step and `close()` at the end. The sharded wrappers
    donate nothing, keep params and optimizer state in their placement and run with the mesh
    in context."""
    c = config
    _, data_key, dropout_key, eval_key = run_keys(root)
    feed = make_feed(feed_kind, dataset, c, mesh, data_key, eval_key)
    batch_sharding = sharding.batch_sharding(mesh, 1)  # (accum, batch, seq+1) split on the batch
    # use_bf16 + master_weights: float32 params, bfloat16 compute (see make_train_step).
    compute = jnp.bfloat16 if c.use_bf16 and c.master_weights else None
    doc_sep = document_separator(config, dataset)
    step_fn = make_train_step(static, optimizer, alpha_balance=c.alpha_balance, trainable=trainable,
                              donate=False, compute_dtype=compute, doc_sep=doc_sep)
    eval_fn = make_eval_step(static, alpha_balance=c.alpha_balance, compute_dtype=compute, doc_sep=doc_sep)
    counts_fn = make_counts_fn(static) if c.use_moe else None  # MoE: expert_counts.csv

    def train_step(params, opt_state, data, step):
        batch = jax.lax.with_sharding_constraint(feed.train_batch(data, step), batch_sharding)
        return step_fn(params, opt_state, batch, jax.random.fold_in(dropout_key, step))

    def evaluate(params, train, val, step):
        batches = [jax.lax.with_sharding_constraint(b, batch_sharding) for b in feed.eval_batches((train, val), step)]
        tokens = batches[1][0] if isinstance(batches[1], tuple) else batches[1]  # packed: (tokens, flags)
        counts = None if counts_fn is None else counts_fn(params, tokens)
        return eval_fn(params, batches[0]), eval_fn(params, batches[1]), all_finite(params), counts

    rep, data = NamedSharding(mesh, P()), feed.sharding
    sharded_step = sharding.shard_train_step(train_step, mesh, params, opt_state, data_shardings=(data, rep))
    sharded_eval = sharding.shard_eval_step(evaluate, mesh, params, data_shardings=(data, data, rep))
    return (lambda p, o, step: sharded_step(p, o, feed.train_arg(step), step),
            lambda p, step: sharded_eval(p, *feed.eval_args(step), step), feed)
