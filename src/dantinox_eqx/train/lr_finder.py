"""The learning-rate range test (Smith 2015): train briefly with an exponentially rising LR.

    suggested_lr, lrs, losses = find_lr(config, data, min_lr=1e-6, max_lr=1e-2, num_steps=100)

Step `s` of `num_steps` trains at `min_lr * (max_lr / min_lr) ** (s / (num_steps - 1))`, with
the config's own optimizer (same family, betas, clipping, weight decay and decay mask: only the
schedule is replaced by the ramp). The loss is smoothed with a bias-corrected exponential
moving average; the test stops early once the smoothed loss exceeds `diverge_factor` x its best
(or the loss is not finite). The suggestion is the LR of steepest descent of the smoothed loss
against log(LR), i.e. the most negative d loss / d log lr, skipping the first points (the
average is still warming up there) and the last one when the test diverged.

The test trains a fresh model in memory and writes nothing: no run directory, checkpoint or log
is created or changed (preparing the data may cache token ids beside the corpus, as training
does).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config, ConfigError
from ..data.feeds import choose_feed, packed_batch, philox_key, read_batch
from ..data.sampling import Dataset, prepare_data, sample_batch
from ..data.tokens import TRAIN_STREAM, Splits
from ..model import Transformer, cast_floating
from .inputs import initial_model, resolve_vocab, trainable_mask, training_data
from .optim import make_optimizer
from .population import (
    build_population_programs,
    check_members,
    check_population_memory,
    member_values,
    mu_dtype,
    place,
    population_mesh,
    stack,
)
from .programs import document_separator, run_keys
from .step import init_opt_state, make_train_step

__all__ = ["find_lr", "batches", "exponential_ramp", "smooth_losses", "steepest_descent",
           "prepare_config_data", "find_lr_population", "find_lr_population_on_path", "PopulationLR"]


def exponential_ramp(min_lr: float, max_lr: float, num_steps: int) -> Any:
    """The schedule `step -> min_lr * (max_lr / min_lr) ** (step / (num_steps - 1))`.

    Step 0 trains at `min_lr`, step `num_steps - 1` at `max_lr`; the LR grows by the same factor
    every step, so the steps are evenly spaced on a log axis.
    """
    log_ratio = math.log(max_lr / min_lr)
    denom = max(num_steps - 1, 1)

    def schedule(step: Any) -> Any:
        return min_lr * jnp.exp(log_ratio * jnp.asarray(step, jnp.float32) / denom)

    return schedule


def smooth_losses(losses: Any, smoothing: float = 0.98) -> np.ndarray:
    """Bias-corrected exponential moving average: `avg_i / (1 - smoothing ** (i + 1))` with
    `avg_i = smoothing * avg_{i-1} + (1 - smoothing) * loss_i` (the first value is the loss)."""
    out, avg = [], 0.0
    for i, loss in enumerate(np.asarray(losses, np.float64)):
        avg = smoothing * avg + (1.0 - smoothing) * loss
        out.append(avg / (1.0 - smoothing ** (i + 1)))
    return np.asarray(out)


def steepest_descent(lrs: Any, smoothed: Any, *, skip_start: int | None = None, skip_end: int = 0) -> float:
    """The LR where `smoothed` falls fastest against log(LR): argmin of np.gradient(smoothed,
    log lrs) over the points `[skip_start, len - skip_end)`. `skip_start` defaults to a tenth of
    the points (at least 1); when too few points remain, every point is used."""
    lrs, smoothed = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
    n = len(lrs)
    if n < 2:
        raise ValueError("steepest_descent needs at least 2 points")
    if skip_start is None:
        skip_start = max(1, n // 10)
    slopes = np.gradient(smoothed, np.log(lrs))
    lo, hi = skip_start, n - skip_end
    if hi - lo < 2:
        lo, hi = 0, n
    window = slopes[lo:hi]
    window = np.where(np.isfinite(window), window, np.inf)
    return float(lrs[lo + int(np.argmin(window))])


def _check_args(min_lr: float, max_lr: float, num_steps: int, smoothing: float, diverge_factor: float) -> None:
    if not min_lr > 0:
        raise ConfigError(f"min_lr: must be positive, got {min_lr}")
    if not max_lr > min_lr:
        raise ConfigError(f"max_lr: must be greater than min_lr={min_lr}, got {max_lr}")
    if num_steps < 5:
        raise ConfigError(f"num_steps: the range test needs at least 5 steps, got {num_steps}")
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"smoothing: must be in [0, 1), got {smoothing}")
    if not diverge_factor > 1.0:
        raise ConfigError(f"diverge_factor: must be greater than 1, got {diverge_factor}")


def find_lr(config: Config, data: Dataset | Splits, min_lr: float = 1e-6, max_lr: float = 1e-2, num_steps: int = 100,
            *, smoothing: float = 0.98, diverge_factor: float = 4.0, model: Transformer | None = None,
            trainable: Any = None) -> tuple[float, list[float], list[float]]:
    """Run the range test on `data` (a `prepare_data` Dataset, or `tokens.Splits`) with a fresh model of `config`
    (or a copy of `model`, e.g. pretrained weights to fine-tune; `trainable` is the bool pytree
    of `make_train_step`, e.g. LoRA's, to test only those leaves). The caller's model is not
    changed: the test updates its own copy of the arrays.

    Returns `(suggested_lr, lr_history, loss_history)`: the LR of each step taken and the
    smoothed (bias-corrected EMA) training loss after it; both lists stop at the step where the
    smoothed loss first exceeded `diverge_factor` x its best, or where the loss became NaN/inf
    (that step is included, with its LR, unless its loss is not finite). The suggestion lies in
    `[min_lr, max_lr]`. Raises ConfigError for bad arguments. Writes nothing.
    """
    _check_args(min_lr, max_lr, num_steps, smoothing, diverge_factor)
    if config.vocab_size is None:
        config = config.replace(vocab_size=data.vocab_size)
    elif config.vocab_size < data.vocab_size:
        raise ConfigError(f"vocab_size: {config.vocab_size} is smaller than the tokenizer's "
                          f"{data.vocab_size}; remove vocab_size or raise it")
    model_key, data_key, step_key = jax.random.split(jax.random.key(config.seed), 3)
    if model is None:
        model = Transformer(config, key=model_key)
    params, static = eqx.partition(model, eqx.is_array)
    params = jax.tree.map(jnp.copy, params)  # the step donates its inputs: never the caller's arrays
    schedule = exponential_ramp(min_lr, max_lr, num_steps)
    optimizer = make_optimizer(config, num_steps, schedule=schedule)
    opt_state = init_opt_state(optimizer, params, trainable)
    step = make_train_step(static, optimizer, alpha_balance=config.alpha_balance, trainable=trainable,
                           doc_sep=document_separator(config, data))  # document_mask: fit's masks
    batch_of = batches(config, data, data_key)

    lrs, smoothed = [], []
    avg, best = 0.0, math.inf
    for s in range(num_steps):
        batch = batch_of(s)
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(step_key, s))
        loss = float(metrics["loss"])  # one host sync per step: the stop rule needs the value now
        if not math.isfinite(loss):
            break
        avg = smoothing * avg + (1.0 - smoothing) * loss
        value = avg / (1.0 - smoothing ** (s + 1))
        lrs.append(float(schedule(s)))
        smoothed.append(value)
        if s > 0 and value > diverge_factor * best:
            break
        best = min(best, value)
    if len(lrs) < 2:
        raise ConfigError(f"min_lr: the loss diverged within {len(lrs) + 1} steps at min_lr={min_lr}; "
                          "lower min_lr")
    diverged = len(lrs) < num_steps
    suggested = steepest_descent(lrs, smoothed, skip_end=1 if diverged else 0)
    return suggested, lrs, smoothed


def batches(config: Config, data: Dataset | Splits, data_key: Any) -> Any:
    """`step -> batch` as training draws them: sampled on the device from the whole array, or
    (issue 14: a prepared dataset, or tokens over FUSED_MAX_BYTES) read on the host; chat data:
    the packed (tokens, flags) bins PackedFeed draws (data/feeds.packed_batch)."""
    shape = (config.grad_accum, config.batch_size)
    if isinstance(data, Splits) and choose_feed(data) == "packed":  # issue 23: the masked loss
        key = philox_key(data_key)
        return lambda s: tuple(jnp.asarray(x) for x in packed_batch(data, "train", key, s, TRAIN_STREAM, shape))
    if isinstance(data, Splits) and choose_feed(data) == "host":
        key = philox_key(data_key)
        return lambda s: jnp.asarray(read_batch(data.train, key, s, TRAIN_STREAM, shape, config.max_context))
    train = jnp.asarray(data.train.array() if isinstance(data, Splits) else data.train)
    return lambda s: sample_batch(train, jax.random.fold_in(data_key, s), config.batch_size, config.max_context,
                                  config.grad_accum)


def prepare_config_data(config: Config, data_path: str | os.PathLike) -> Dataset:
    """The Dataset training would see for `config`: its tokenizer (the one at `tokenizer_path`
    when set, else one trained on the corpus), context length, split and token cap."""
    tokenizer = None
    if config.tokenizer_path:
        from ..data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer_path)
    return prepare_data(data_path, tokenizer_type=config.tokenizer_type, max_context=config.max_context,
                        val_fraction=config.val_fraction, max_train_tokens=config.max_train_tokens,
                        bpe_vocab_size=config.bpe_vocab_size, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------ population
@dataclasses.dataclass(frozen=True)
class PopulationLR:
    """`find_lr_population`'s result: per learning rate (log-spaced, ascending), the validation
    loss after training (inf where the member diverged) and the smoothed training loss of its
    last step; `curves[k]` is member k's smoothed training loss at every step."""

    lrs: list[float]
    val_loss: list[float]
    train_loss: list[float]
    curves: list[list[float]]
    best_lr: float


def find_lr_population(config: Config, data: Dataset | Splits, min_lr: float = 1e-5, max_lr: float = 1e-2,
                       population: int = 8, num_steps: int = 300, *, smoothing: float = 0.98,
                       model: Transformer | None = None) -> PopulationLR:
    """Train `population` copies of the model `fit` would start from side by side, one jitted
    vmapped step for all (train/population.py), each at its own peak learning rate (log-spaced
    from min_lr to max_lr) and otherwise as the config trains: its optimizer, schedule (over
    `num_steps`; warm-up capped at a tenth of them), batches and dropout, identical in every
    member but the rate. The best rate is the one with the lowest validation loss after
    `num_steps` (eval_iters batches, the same for every member). A slower companion of the range
    test that reads the rates' effect after real training rather than along one ramp. Writes
    nothing. Raises ConfigError for bad arguments or a population too large for memory."""
    if population < 1:
        raise ConfigError(f"--population: the number of learning rates must be at least 1, got {population}")
    _check_args(min_lr, max_lr, max(num_steps, 5), smoothing, 2.0)
    config = config if config.vocab_size is not None else config.replace(vocab_size=data.vocab_size)
    lrs = [float(x) for x in np.geomspace(min_lr, max_lr, population)]
    configs = [config.replace(lr=lr, max_steps=num_steps, warmup_steps=min(config.warmup_steps, num_steps // 10))
               for lr in lrs]
    check_members(configs)
    check_population_memory(configs[0], population, data)
    mesh = population_mesh(population, config.n_devices)
    root = jax.random.key(config.seed)
    if model is None:  # what fit starts from: fresh from the seed's init key, or init_from's weights
        model = initial_model(config, run_keys(root)[0])[0]
    params, static = eqx.partition(model, eqx.is_array)
    moments = mu_dtype(config)
    if moments is not None:  # use_bf16 without master weights: bfloat16 params, as fit trains them
        params = cast_floating(params, moments)
    optimizer = make_optimizer(configs[0], num_steps, mu_dtype=moments)
    params = stack([params] * population, mesh)
    opt_state = stack([init_opt_state(optimizer, jax.tree.map(lambda x: x[0], params))] * population, mesh)
    values, roots = place(member_values(configs), mesh), stack([root] * population, mesh)
    programs = build_population_programs(configs[0], static, trainable_mask(model), data, mesh, num_steps,
                                         [root] * population, mu_dtype=moments)
    active = np.ones(population, bool)
    losses = []
    programs.start(np.zeros(population, np.int32), num_steps)
    try:
        for s in range(num_steps):
            params, opt_state, metrics = programs.step(params, opt_state, values, roots,
                                                       np.full(population, s, np.int32), active)
            losses.append(metrics["loss"])  # fetched once at the end: the loop never waits
    finally:
        programs.close()
    losses = np.asarray(jax.device_get(jnp.stack(losses)), np.float64)  # (num_steps, population)
    _, val, finite, _ = jax.device_get(programs.evaluate(params, np.full(population, num_steps, np.int32)))
    val_loss = [float(v) if ok and math.isfinite(v) else math.inf for v, ok in zip(val["loss"], finite)]
    curves = [smooth_losses(losses[:, k], smoothing).tolist() for k in range(population)]
    best = int(np.argmin(val_loss))
    if not math.isfinite(val_loss[best]):
        raise ConfigError(f"min_lr: every learning rate from {min_lr} to {max_lr} diverged; lower both")
    return PopulationLR(lrs, val_loss, [c[-1] for c in curves], curves, lrs[best])


def find_lr_population_on_path(config: Config, data_path: str | os.PathLike, min_lr: float = 1e-5,
                               max_lr: float = 1e-2, population: int = 8, num_steps: int = 300, *,
                               smoothing: float = 0.98) -> PopulationLR:
    """`find_lr_population` on `data_path` read as training reads it (train/inputs.training_data:
    a text file, a prepared directory or any source `prepare` takes; the tokenizer_path's or an
    init_from base run's tokenizer when set), each member fed as `fit` would feed it."""
    if population < 1:  # before preparing the data
        raise ConfigError(f"--population: the number of learning rates must be at least 1, got {population}")
    _, data = training_data(config, data_path, None, resume=False)
    return find_lr_population(resolve_vocab(config, data.vocab_size), data, min_lr, max_lr, population, num_steps,
                              smoothing=smoothing)
