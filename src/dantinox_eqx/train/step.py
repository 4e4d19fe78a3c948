"""The loss and the pure, jitted training and evaluation steps.

    step = make_train_step(static, optimizer)
    params, opt_state, metrics = step(params, opt_state, batch, key)

`params` is the array part of the model (`eqx.partition(model, eqx.is_array)`), `static` the
rest, closed over. A `batch` holds token windows of shape (grad_accum, batch, seq + 1): inputs
are `[..., :-1]`, targets `[..., 1:]`. Micro-batches are accumulated with `lax.scan` inside the
one jitted call, so the compiled graph does not depend on `grad_accum`.

With a `trainable` filter (LoRA), only the selected leaves get gradients and optimizer state:
initialise with `init_opt_state(optimizer, params, trainable)`.

Masked batches (chat fine-tuning, packed documents; issue 23): a batch may instead be a pair
`(tokens, flags)` of equal shape, flags the bits `TRAINED` (the token is trained as a target:
the prediction of it counts in the loss) and `STARTS` (the token starts a new example: attention
and positions restart there). The loss is then the SUM of the trained tokens' cross-entropies
over the whole accumulated (and, under a mesh, all-device) batch divided by the batch's
trained-token count, not a mean of per-micro-batch means. `doc_sep` (config `document_mask`)
makes these flags from plain token windows: a document starts after each end-of-text token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Scalar

from ..model import cast_floating
from ..parallel.sharding import DATA
from .grad_norm import global_norm

__all__ = ["TRAINED", "STARTS", "cross_entropy", "loss_fn", "masked_sums", "document_flags",
           "make_train_step", "make_eval_step", "init_opt_state", "per_device_loss"]

Metrics = dict[str, Array]
TRAINED, STARTS = 1, 2  # the bits of a masked batch's flags (see the module docstring)


def cross_entropy(logits: Float[Array, "*B T V"], targets: Int[Array, "*B T"]) -> Scalar:
    """Mean token cross-entropy, computed in float32 whatever the logits' dtype."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def loss_fn(model: Any, batch: Int[Array, "B W"], key: PRNGKeyArray | None = None,
            alpha_balance: float = 0.0) -> tuple[Scalar, Metrics]:
    """LM loss (+ alpha_balance * MoE balance loss) of `model` on windows `batch` (W = T + 1).

    The loss goes through `model.token_loss` (nn/cross_entropy.py): with a large vocabulary the
    (B, T, V) logits are computed a chunk of tokens at a time and never stored whole."""
    features, balance = model.features(batch[:, :-1], key=key)
    loss_sum, weight_sum = model.token_loss(features, batch[:, 1:])
    lm = loss_sum / weight_sum
    return lm + alpha_balance * balance, {"loss": lm, "bal": balance}


def document_flags(tokens: Int[Array, "*B W"], doc_sep: int) -> Int[Array, "*B W"]:
    """Flags of plain windows cut into documents by the end-of-text id `doc_sep`: a document
    starts after each `doc_sep` (which ends, and is trained with, the document before it); the
    first token of a document is not trained (predicting it would read across the boundary)."""
    after = jnp.concatenate([jnp.zeros_like(tokens[..., :1], bool), tokens[..., :-1] == doc_sep], axis=-1)
    return jnp.where(after, STARTS, TRAINED).astype(jnp.int32)


def masked_sums(model: Any, batch: tuple[Array, Array], key: PRNGKeyArray | None = None
                ) -> tuple[Scalar, Scalar, Scalar]:
    """(sum of the trained tokens' cross-entropies, their count, MoE balance) of `model` on a
    masked batch `(tokens, flags)`, each (B, W = T + 1). The inputs are tokens[:, :-1], split
    into segments at the STARTS bits (`Transformer`'s `segment_ids`); the targets
    tokens[:, 1:] count where their TRAINED bit is set (the mask is on the predicted token).
    Through `model.token_loss`, as `loss_fn`: the (B, T, V) logits are never whole when large."""
    tokens, flags = batch
    flags = flags.astype(jnp.int32)
    segments = jnp.cumsum((flags[:, :-1] & STARTS) > 0, axis=-1, dtype=jnp.int32)
    features, balance = model.features(tokens[:, :-1], key=key, segment_ids=segments)
    weights = ((flags[:, 1:] & TRAINED) > 0).astype(jnp.float32)
    loss_sum, weight_sum = model.token_loss(features, tokens[:, 1:], weights)  # chunked, as loss_fn
    return loss_sum, weight_sum, balance


def _as_masked(batch: Any, doc_sep: int | None) -> tuple[Array, Array] | None:
    """The (tokens, flags) of a masked batch, or None for a plain token batch without doc_sep."""
    if isinstance(batch, tuple | list):
        return tuple(batch)
    return None if doc_sep is None else (batch, document_flags(batch, doc_sep))


def _trained_count(flags: Array) -> Scalar:
    """The trained targets of a whole batch (..., W), at least 1 (an all-prompt batch: loss 0)."""
    return jnp.maximum(((flags[..., 1:].astype(jnp.int32) & TRAINED) > 0).sum(), 1).astype(jnp.float32)


def _everything(params: PyTree) -> PyTree:
    return jax.tree.map(lambda _: True, params)


def init_opt_state(optimizer: optax.GradientTransformation, params: PyTree,
                   trainable: PyTree | None = None) -> PyTree:
    """Optimizer state for the trainable leaves of `params` only (all leaves when None), built
    in one compiled program (issue 16: eagerly, each moment's zeros is a program of its own)."""
    return eqx.filter_jit(optimizer.init)(eqx.filter(params, trainable if trainable is not None
                                                     else _everything(params)))


def make_train_step(static: PyTree, optimizer: optax.GradientTransformation, *,
                    alpha_balance: float = 0.0, trainable: PyTree | None = None,
                    donate: bool = True, compute_dtype: Any = None, doc_sep: int | None = None) -> Callable:
    """Build `step(params, opt_state, batch, key) -> (params, opt_state, metrics)`, jitted.

    - static: the non-array part of the model, closed over.
    - trainable: a pytree of bools like `params` (e.g. `lora.lora_trainable(model)`); leaves
      marked False are frozen: no gradient, no optimizer state, returned bitwise unchanged.
    - batch: int32 (grad_accum, batch, seq + 1). The gradient is the mean over micro-batches,
      equal to the gradient of the concatenated batch.
    - metrics: mean "loss" (LM), "bal" (MoE balance) and the pre-clip "grad_norm", as arrays
      (fetch them only when you log, so the loop never waits on the device).
    - compute_dtype: e.g. bfloat16 with float32 `params` = mixed precision with float32 master
      weights: the forward and backward run in compute_dtype, the gradient arrives in float32
      (the cast's transpose) and the update is applied to the float32 masters, so small updates
      are not rounded away as they are with pure bfloat16 weights.
    - batch may be a masked pair (tokens, flags) (module docstring), and `doc_sep` masks plain
      batches by documents: the loss is then the trained tokens' summed cross-entropy over the
      whole batch divided by its trained-token count, so accumulation 4 x 2 equals 1 x 8 even
      when the micro-batches hold different numbers of trained tokens.
    Buffers of `params` and `opt_state` are donated (updated in place) unless donate=False.
    """

    def lm_loss(train_p, frozen_p, micro, key):
        model = eqx.combine(train_p, frozen_p, static)
        if compute_dtype is not None:
            model = cast_floating(model, compute_dtype)
        return loss_fn(model, micro, key, alpha_balance)

    grad_fn = jax.value_and_grad(lm_loss, has_aux=True)

    def masked_loss(train_p, frozen_p, micro, key, total, n_micro):
        model = eqx.combine(train_p, frozen_p, static)
        if compute_dtype is not None:
            model = cast_floating(model, compute_dtype)
        ce, _, balance = masked_sums(model, micro, key)
        lm = ce / total  # this micro-batch's share of the whole batch's token mean
        return lm + alpha_balance * balance / n_micro, {"loss": lm, "bal": balance / n_micro}

    masked_grad = jax.value_and_grad(masked_loss, has_aux=True)

    def masked_step(params, opt_state, batch, key):
        train_p, frozen_p = eqx.partition(params, trainable if trainable is not None else _everything(params))
        n = batch[0].shape[0]
        total = _trained_count(batch[1])  # the whole batch's (all micro-batches, all devices)
        keys = jax.random.split(key, n)
        if n == 1:  # no accumulation: no scan (as the plain step), so a chat step costs a plain one
            (_, metrics), grads = masked_grad(train_p, frozen_p, (batch[0][0], batch[1][0]), keys[0], total, n)
            return _apply(grads, metrics, train_p, frozen_p, opt_state)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), train_p)

        def micro_step(acc, xs):  # summed, not averaged: each term is already divided by `total`
            micro, k = xs
            (_, m), g = masked_grad(train_p, frozen_p, micro, k, total, n)
            acc_g, acc_m = acc
            acc_g = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc_g, g)
            return (acc_g, jax.tree.map(jnp.add, acc_m, m)), None

        init = (zeros, {"loss": jnp.zeros(()), "bal": jnp.zeros(())})
        (grads, metrics), _ = jax.lax.scan(micro_step, init, (batch, keys))
        return _apply(jax.tree.map(lambda g, p: g.astype(p.dtype), grads, train_p), metrics, train_p, frozen_p,
                      opt_state)

    def _apply(grads, metrics, train_p, frozen_p, opt_state):
        metrics["grad_norm"] = global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, train_p)
        train_p = eqx.apply_updates(train_p, updates)
        return eqx.combine(train_p, frozen_p), opt_state, metrics

    def step(params, opt_state, batch, key):
        masked = _as_masked(batch, doc_sep)
        if masked is not None:
            return masked_step(params, opt_state, masked, key)
        train_p, frozen_p = eqx.partition(params, trainable if trainable is not None else _everything(params))
        keys = jax.random.split(key, batch.shape[0])
        if batch.shape[0] == 1:
            (_, metrics), grads = grad_fn(train_p, frozen_p, batch[0], keys[0])
        else:
            # Accumulate in float32 so bfloat16 gradients lose nothing across micro-batches.
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), train_p)

            def micro_step(acc, xs):
                (_, m), g = grad_fn(train_p, frozen_p, *xs)
                acc_g, acc_m = acc
                acc_g = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc_g, g)
                return (acc_g, jax.tree.map(jnp.add, acc_m, m)), None

            init = (zeros, {"loss": jnp.zeros(()), "bal": jnp.zeros(())})
            (grads, metrics), _ = jax.lax.scan(micro_step, init, (batch, keys))
            n = batch.shape[0]
            grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, train_p)
            metrics = jax.tree.map(lambda m: m / n, metrics)
        metrics["grad_norm"] = global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, train_p)
        train_p = eqx.apply_updates(train_p, updates)
        return eqx.combine(train_p, frozen_p), opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def make_eval_step(static: PyTree, *, alpha_balance: float = 0.0, compute_dtype: Any = None,
                   doc_sep: int | None = None) -> Callable:
    """Build `eval_step(params, batches) -> metrics`, jitted: mean "loss" and "bal" over
    `batches` of shape (n_batches, batch, seq + 1), without dropout (and in compute_dtype).
    Masked batches (a (tokens, flags) pair, or `doc_sep`): "loss" is the mean over all the
    trained tokens of all the batches."""

    def eval_step(params, batches):
        model = eqx.combine(params, static)
        if compute_dtype is not None:
            model = cast_floating(model, compute_dtype)
        masked = _as_masked(batches, doc_sep)
        if masked is not None:
            def sums(carry, batch):
                ce, count, balance = masked_sums(model, batch)
                return carry, (ce, count, balance)

            _, (ce, count, balance) = jax.lax.scan(sums, None, masked)
            return {"loss": ce.sum() / jnp.maximum(count.sum(), 1.0), "bal": balance.mean()}

        def one(carry, batch):
            _, m = loss_fn(model, batch, None, alpha_balance)
            return carry, m

        _, metrics = jax.lax.scan(one, None, batches)
        return jax.tree.map(jnp.mean, metrics)

    return jax.jit(eval_step)


def per_device_loss(static: PyTree, mesh: Mesh) -> Callable:
    """`f(params, batch (accum, batch, seq + 1)) -> (n_devices,)` LM loss of each device's share
    of the batch, for debugging data-parallel runs (e.g. one device's data gone bad).

    An explicit per-device computation, so it uses `jax.shard_map` (not pmap): each device
    gathers the parameters it needs (FSDP) and evaluates its own rows, no cross-device mean.
    The mean of the result equals the global loss when shards are equal-sized.
    """
    def local(params, batch: Int[Array, "accum rows window"]):
        model = eqx.combine(params, static)
        losses = jax.vmap(lambda micro: loss_fn(model, micro)[1]["loss"])(batch)
        return jnp.mean(losses)[None]

    def f(params, batch):
        specs = jax.tree.map(lambda _: P(), params)  # gather parameters whole on every device
        return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(None, DATA)), out_specs=P(DATA))(params, batch)

    return jax.jit(f)
