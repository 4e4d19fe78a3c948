"""`from_pretrained(run_dir)`: the trained `Transformer` of a run directory (our own runs, LoRA
runs with or without a base run, exports). `Transformer.from_pretrained` delegates here: this
module attaches it to the class when imported (the model layer does not import the run layer)."""

from __future__ import annotations

import os
from typing import Any

from ..lora import has_lora
from ..lora import merge_lora as merge_lora_weights
from ..model import Transformer, cast_floating, with_max_context
from . import finetune
from .weights import load_config, restore_arrays, saved_dtypes, skeleton

__all__ = ["load_config", "from_pretrained", "restore_arrays", "saved_dtypes", "skeleton"]


def from_pretrained(run_dir: str | os.PathLike, best: bool = True, *, dtype: Any = None,
                    inference: bool = False, merge_lora: bool = False, max_context: int | None = None
                    ) -> Transformer:
    """The trained `Transformer` of `run_dir`.

    - best: load the best-validation checkpoint (True) or the latest one (False).
    - dtype: cast floating weights to this dtype after loading (None: keep the saved dtype).
    - inference: build the model for sampling. For `mla` models this switches to the absorbed,
      latent-cached attention (`config.inference=True`); the parameters are the same.
    - merge_lora: for a LoRA run, return W + (alpha / r) A @ B as plain Linears (what sampling
      wants: no adapter GEMMs); False keeps the LoRALinear modules (unmerged, trainable).
    - max_context: the window / KV-cache size to use instead of the run's (None: the run's).
      Any value for RoPE models; with a learned position table at most its rows (its first
      rows are used; `model.with_max_context`), else ConfigError naming max_context.
    Raises FileNotFoundError / ConfigError / CheckpointError naming the run directory when it
    is missing, incomplete or does not match its own config.
    """
    config = load_config(run_dir)
    if inference and config.mla:
        config = config.replace(inference=True)
    model = finetune.load_run(run_dir, config, best, inference=inference)
    if merge_lora and has_lora(model):
        model = merge_lora_weights(model)
    if max_context is not None:
        model = with_max_context(model, max_context)
    return model if dtype is None else cast_floating(model, dtype)


def _from_pretrained(cls: type, run_dir: str | os.PathLike, best: bool = True, *, dtype: Any = None,
                     max_context: int | None = None) -> Transformer:
    """Load a trained run directory's model (best checkpoint, or latest with best=False) in the
    dtype it was saved in, at the run's max_context or `max_context`; see `from_pretrained`."""
    return from_pretrained(run_dir, best, dtype=dtype, max_context=max_context)


# `Transformer.from_pretrained`: the loading layer registers itself on the model class, so the
# model never imports upwards (docs/guides/architecture.md). `dantinox_eqx.Transformer` (the front
# door) imports this module with the model.
Transformer.from_pretrained = classmethod(_from_pretrained)
