"""Learning-rate schedules and the optimizer, composed from optax transformations.

A schedule is a plain function `step -> lr`. Every schedule warms up linearly, then:

    warmup (s < W):      lr * (s + 1) / W                      (reaches lr at s = W - 1)
    p = clip((s - W) / (T - W), 0, 1)                          (progress after warmup)
    cosine:              lo + (lr - lo) * (1 + cos(pi * p)) / 2
    linear:              lr - (lr - lo) * p
    constant:            lr
    wsd:                 lr while p < f, then lo + (lr - lo) * (1 + cos(pi * q)) / 2
                         with q = (p - f) / (1 - f)            (warmup -> stable -> cosine decay)

where lo = lr * min_lr_ratio (0.01 by default), T is the run's total steps and f is
`wsd_stable_fraction` (0.4: the seed's "stable (40 %)" is 40 % of the post-warmup steps).

Optimizers: adamw, adam (no weight decay), lion, adafactor, and muon (`muon.py`: Muon on the
blocks' matrices with the schedule scaled to peak at `muon_lr`, AdamW with `lr` on the rest).

The numbers may be JAX scalars instead of Python numbers: a population (train/population.py)
passes each member's own values, traced inside its vmapped step. With Python numbers the
arithmetic is unchanged (a plain run computes exactly what it always has).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ..config import Config
from .grad_norm import clip_by_global_norm
from .muon import fused_splits, muon_labels, scale_by_block_muon

__all__ = ["make_schedule", "make_optimizer", "decay_mask", "HYPERPARAMETERS"]

# The Config fields the optimizer reads as numbers (a population may give each member its own).
HYPERPARAMETERS = ("lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "min_lr_ratio",
                   "wsd_stable_fraction")


def make_schedule(name: str, lr: float | jax.Array, warmup_steps: int | jax.Array, total_steps: int,
                  min_lr_ratio: float | jax.Array = 0.01,
                  wsd_stable_fraction: float | jax.Array = 0.4) -> optax.Schedule:
    """The schedule `name` ("cosine" | "linear" | "constant" | "wsd"); formulas in the module doc."""
    lo = lr * min_lr_ratio
    traced = not isinstance(warmup_steps, int)  # a population member's value (a JAX scalar)
    W = warmup_steps
    T = jnp.maximum(total_steps, W + 1) if traced else max(total_steps, W + 1)

    def schedule(step: Any) -> Any:
        s = jnp.asarray(step, jnp.float32)
        p = jnp.clip((s - W) / (T - W), 0.0, 1.0)
        if name == "cosine":
            after = lo + (lr - lo) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        elif name == "linear":
            after = lr - (lr - lo) * p
        elif name == "constant":
            after = jnp.full_like(p, lr)
        elif name == "wsd":
            f = wsd_stable_fraction
            q = jnp.clip((p - f) / (1.0 - f), 0.0, 1.0)
            after = lo + (lr - lo) * 0.5 * (1.0 + jnp.cos(jnp.pi * q))
        else:
            raise ValueError(f"lr_schedule: unknown schedule {name!r}")
        if not traced and W == 0:
            return after  # (traced: s < 0 never holds, so the where below gives `after`)
        return jnp.where(s < W, lr * (s + 1.0) / W, after)

    return schedule


def decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay: the matrices of `Linear`s (fields named
    `weight`, LoRA factors excluded) and nothing else (no norms, biases or embeddings)."""

    def is_decayed(path: tuple, leaf: Any) -> bool:
        last = path[-1] if path else None
        return getattr(last, "name", None) == "weight" and getattr(leaf, "ndim", 0) >= 2

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(config: Config, total_steps: int, *, mu_dtype: Any = None,
                   schedule: optax.Schedule | None = None,
                   values: dict[str, Any] | None = None) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> the chosen optimizer with the config's schedule.

    `mu_dtype` sets the dtype of first moments (bfloat16 for use_bf16, as the seed does).
    `schedule` replaces the config's schedule (the LR finder's exponential ramp) and leaves
    everything else (betas, clipping, weight decay and its mask) as a real run has it.
    `values` replaces the config's numbers (any of HYPERPARAMETERS; JAX scalars in a
    population's vmapped step); the config still decides the structure of the optimizer and
    of its state: the family, the schedule's shape, clipping on or off, adafactor's decay.
    """
    h = {name: getattr(config, name) for name in HYPERPARAMETERS} | dict(values or {})
    if schedule is None:
        schedule = make_schedule(config.lr_schedule, h["lr"], h["warmup_steps"], total_steps,
                                 h["min_lr_ratio"], h["wsd_stable_fraction"])
    if config.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=h["beta1"], b2=h["beta2"], weight_decay=h["weight_decay"],
                          mask=decay_mask, mu_dtype=mu_dtype)
    elif config.optimizer == "lion":
        opt = optax.lion(schedule, b1=h["beta1"], b2=h["beta2"], weight_decay=h["weight_decay"],
                         mask=decay_mask, mu_dtype=mu_dtype)
    elif config.optimizer == "adam":  # issue 16: DantinoX's plain Adam (weight_decay unused)
        opt = optax.adam(schedule, b1=config.beta1, b2=config.beta2, mu_dtype=mu_dtype)
    elif config.optimizer == "muon":  # issue 16
        opt = _muon(config, schedule, mu_dtype)
    elif config.optimizer == "adafactor":
        opt = optax.adafactor(schedule, multiply_by_parameter_scale=False,
                              weight_decay_rate=h["weight_decay"] if config.weight_decay else None,
                              weight_decay_mask=decay_mask)
    else:
        raise ValueError(f"optimizer: unknown optimizer {config.optimizer!r}")
    if config.grad_clip > 0:
        return optax.chain(clip_by_global_norm(h["grad_clip"]), opt)
    return opt


def _muon(config: Config, schedule: optax.Schedule, mu_dtype: Any) -> optax.GradientTransformation:
    """Muon on `muon.muon_labels`' matrices (lr: `schedule` * muon_lr / lr, so a replaced
    schedule such as the LR finder's ramp keeps the two groups' ratio), AdamW on the rest."""
    ratio = config.muon_lr / config.lr
    muon = optax.chain(scale_by_block_muon(fused_splits(config), config.muon_momentum, mu_dtype),
                       optax.add_decayed_weights(config.muon_weight_decay, decay_mask),
                       optax.scale_by_learning_rate(lambda step: schedule(step) * ratio))
    adamw = optax.adamw(schedule, b1=config.beta1, b2=config.beta2, weight_decay=config.weight_decay,
                        mask=decay_mask, mu_dtype=mu_dtype)
    return optax.partition({"muon": muon, "adamw": adamw},
                           lambda params: muon_labels(params, config.muon_params))
