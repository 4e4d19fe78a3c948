"""Fine-tuning from a trained run: loading the base, the pointer to it, and LoRA run directories.

`Config.init_from = BASE_RUN` starts training from the best weights of the run directory
BASE_RUN, with its tokenizer (never retrained: characters of the new corpus outside a char
vocabulary are a DataError). The config must keep the base's MODEL_SHAPE_FIELDS; its max_context
may differ (a learned position table: only shorter, its first rows; `model.with_max_context`). With
`use_lora: true` the base is frozen and LoRA adapters train (`lora.py`); without it every
weight trains (full fine-tuning, an ordinary run directory).

The run directory of a LoRA fine-tune of BASE_RUN holds only what it trained:

    config.yaml         use_lora: true, init_from: the absolute path of BASE_RUN
    tokenizer.json      a copy of BASE_RUN's tokenizer
    lora_base.json      {"base_run": absolute path, "checkpoint": "best", "step": S,
                         "params_sha256": digest of the base weights the adapter was trained on}
    checkpoints/best/<step>/params                   adapter arrays only (blocks.attn.qkv.lora_a, ...)
    checkpoints/latest/<step>/{params,train_state}   adapter arrays, adapter-only optimizer state
    model_summary.json  with trainable_params / trainable_percent (lora_summary)

`from_pretrained(lora_run)` (hence `Generator`, `evaluate`, `export`) loads the base through the
pointer, checks its digest (a base trained further or replaced since is refused, never silently
combined), adds adapters with the run's lora_* fields and restores the adapter arrays. `export
--merge-lora` writes a self-contained copy that needs the base no more.

A LoRA run trained on a model passed to `Trainer(config, model=...)` with no init_from has no
base run to point to: its checkpoints hold the whole adapted model (base + adapters) and no
lora_base.json; it loads the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..config import MODEL_SHAPE_FIELDS, Config, ConfigError
from ..files import atomic_write_text
from ..lora import adapter_params, apply_lora, has_lora, load_adapter, merge_lora
from ..model import Transformer, cast_floating, with_max_context
from . import checkpoint
from .checkpoint import CheckpointError
from .layout import CONFIG_FILE, LORA_BASE_FILE
from .weights import load_config, restore_arrays, skeleton, which

__all__ = ["BASE_FILE", "base_dir", "params_digest", "check_base_shape", "load_base", "pointer_of",
           "read_pointer", "write_pointer", "add_adapters", "load_lora_run"]

BASE_FILE = LORA_BASE_FILE  # the name other modules and tests use


def params_digest(tree: Any) -> str:
    """SHA-256 over every array of `tree` (names, dtypes, shapes and bytes, by sorted name)."""
    h = hashlib.sha256()
    flat = checkpoint.flatten(eqx.filter(tree, eqx.is_array))
    for name in sorted(flat):
        arr = np.asarray(jax.device_get(flat[name]))
        h.update(f"{name}|{arr.dtype}|{arr.shape}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def base_dir(init_from: str | os.PathLike) -> Path:
    """The absolute path of the run directory `init_from` (ConfigError naming init_from if it is not one)."""
    path = Path(init_from).expanduser()
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"init_from: {str(init_from)!r} is not a run directory (no config.yaml); "
                          "pass the directory of a finished `dantinox-eqx train` run")
    return path.resolve()


def check_base_shape(base: Config, config: Config, init_from: Any) -> None:
    """ConfigError naming init_from and the field when `config` changes a MODEL_SHAPE_FIELD of
    the base run's config (a fine-tune keeps its base's parameter shapes)."""
    for name in MODEL_SHAPE_FIELDS:
        old, new = getattr(base, name), getattr(config, name)
        if old != new:
            raise ConfigError(f"init_from: the base run {str(init_from)!r} has {name}={old!r}, this config has "
                              f"{name}={new!r}; a fine-tune keeps its base's shape: drop the {name} override "
                              "or choose a base run of that shape")
    # max_context is free for RoPE / sinusoidal models; a learned table serves only a shorter window.
    if base.absolute_pos and base.trainable_pos and config.max_context > base.max_context:
        raise ConfigError(f"max_context: the base run {str(init_from)!r} has a learned position table of "
                          f"{base.max_context} rows, so max_context={config.max_context} cannot exceed it; "
                          f"use max_context <= {base.max_context}")


def _load(path: Path, best: bool = True, inference: bool = False) -> Transformer:
    """A run's plain model (a LoRA run's adapters merged in), errors prefixed with init_from."""
    try:
        model = load_run(path, load_config(path), best, inference=inference)
    except (FileNotFoundError, CheckpointError, ConfigError) as e:
        raise type(e)(f"init_from: {e}") from None
    return merge_lora(model) if has_lora(model) else model


def load_base(init_from: str | os.PathLike, config: Config) -> tuple[Transformer, dict[str, Any]]:
    """The best weights of the run `init_from` (shape-checked against `config`) and the pointer
    to them written as lora_base.json."""
    path = base_dir(init_from)
    check_base_shape(load_config(path), config, init_from)
    model = _load(path, best=True)
    # The pointer's digest is of the base as saved; the window is set after (loading does the same).
    return with_max_context(model, config.max_context), _pointer(path, checkpoint.BEST, model)


def _pointer(path: Path, which: str, model: Any) -> dict[str, Any]:
    return {"base_run": str(path), "checkpoint": which, "step": checkpoint.latest_step(path, which),
            "params_sha256": params_digest(model)}


def pointer_of(model: Any, init_from: str | os.PathLike, config: Config) -> dict[str, Any]:
    """The pointer for a given `model` that must hold the best (or else latest) weights of the
    run `init_from`: ConfigError when it holds neither (the fine-tune could not be reloaded)."""
    path = base_dir(init_from)
    check_base_shape(load_config(path), config, init_from)
    digest = params_digest(model)
    for name in (checkpoint.BEST, checkpoint.LATEST):
        pointer = _pointer(path, name, _load(path, best=name == checkpoint.BEST))
        if pointer["params_sha256"] == digest:
            return pointer
    raise ConfigError(f"init_from: the given model's weights are neither the best nor the latest checkpoint "
                      f"of {str(init_from)!r}; pass Transformer.from_pretrained(init_from) as the model, or "
                      "leave init_from empty and set tokenizer_path (the run then saves the whole model)")


def write_pointer(run_dir: str | os.PathLike, pointer: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / BASE_FILE, json.dumps(pointer, indent=2) + "\n")


def read_pointer(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's lora_base.json, or None when it has none."""
    path = Path(run_dir) / BASE_FILE
    if not path.is_file():
        return None
    try:
        pointer = json.loads(path.read_text(encoding="utf-8"))
        _ = pointer["base_run"], pointer["checkpoint"], pointer["params_sha256"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"run directory {str(run_dir)!r}: {BASE_FILE} is unreadable") from None
    return pointer


def add_adapters(model: Any, config: Config, key: Any = None) -> Any:
    """`apply_lora` with the config's lora_* fields (A from `key`; the default key(0) is for
    skeletons whose factors get restored)."""
    key = jax.random.key(0) if key is None else key
    return apply_lora(model, config.lora_targets, config.lora_rank, config.lora_alpha, config.lora_dropout,
                      key=key)


def _pointed_base(run_dir: Path, pointer: dict[str, Any], inference: bool) -> Transformer:
    path = Path(pointer["base_run"])
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} is a LoRA fine-tune of {str(path)!r}, "
                                "which no longer exists; restore it there, or use a copy exported with "
                                "`dantinox-eqx export RUN_DIR OUT_DIR --merge-lora` while it existed")
    base = _load(path, best=pointer["checkpoint"] == checkpoint.BEST, inference=inference)
    if params_digest(base) != pointer["params_sha256"]:
        now = checkpoint.latest_step(path, pointer["checkpoint"])
        raise CheckpointError(f"run directory {str(run_dir)!r}: its base run {str(path)!r} changed since the "
                              f"fine-tune (its {pointer['checkpoint']!r} checkpoint was step {pointer.get('step')}, "
                              f"is now step {now}, and the weights differ); the adapter only fits the old weights")
    return base


def load_lora_run(run_dir: str | os.PathLike, config: Config, best: bool = True, *,
                  inference: bool = False) -> Transformer:
    """The adapted model (LoRALinear modules, unmerged) of the LoRA run `run_dir` with config
    `config` (see the module docstring)."""
    run_dir = Path(run_dir)
    which = checkpoint.BEST if best else checkpoint.LATEST
    pointer = read_pointer(run_dir)
    if pointer is None:  # a self-contained LoRA run: base and adapters in its own checkpoints
        like = eqx.filter_eval_shape(lambda: add_adapters(Transformer(config, key=jax.random.key(0)), config))
        return restore_arrays(run_dir, which, like)
    base = with_max_context(_pointed_base(run_dir, pointer, inference), config.max_context)
    if config.use_bf16:  # as in training: the base was cast before the adapters were added
        base = cast_floating(base, jnp.bfloat16)
    model = add_adapters(base, config)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapter_params(model))
    return load_adapter(model, restore_arrays(run_dir, which, like))


def load_run(run_dir: str | os.PathLike, config: Config, best: bool = True, *, inference: bool = False
             ) -> Transformer:
    """The model of `run_dir` (whose config is `config`): a LoRA run's adapted model (unmerged),
    else the plain model, in the saved dtypes. `from_pretrained` is the public front of this."""
    if inference and config.mla:
        config = config.replace(inference=True)
    if config.use_lora:
        return load_lora_run(run_dir, config, best, inference=inference)
    return restore_arrays(run_dir, which(best), skeleton(config))
