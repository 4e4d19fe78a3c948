"""Export a trained model: merged weights as `model.safetensors`, and self-contained run dirs.

Tensor names in `model.safetensors` (for use outside this library):

    embedding                      (V, D)      token embedding; also the output head when tied
    pos_embedding                  (C, D)      learned absolute positions (trainable_pos only)
    blocks.{i}.attn_norm.scale     (D,)        block i = 0 .. num_blocks - 1 (the stacked axis
    blocks.{i}.attn.qkv.weight     (D, (H + 2K) E)   of the scanned blocks is unstacked)
    blocks.{i}.attn.o.weight       (H E, D)
    blocks.{i}.mlp_norm.scale      (D,)
    blocks.{i}.mlp.up.weight       (D, F) or (D, 2F) with SwiGLU (gate first, then up)
    blocks.{i}.mlp.down.weight     (F, D)
    norm.scale                     (D,)        (`.bias` too for layernorm)
    head.weight                    (D, V)      absent with weight tying

Every name is the attribute path of the array in the `Transformer` pytree, so MLA and MoE
blocks export the same way (e.g. `blocks.{i}.attn.q_down.weight`, `blocks.{i}.mlp.experts...`).

Layout: a Linear weight is (in, out) and is applied as `y = x @ W` (the transpose of PyTorch's
`nn.Linear.weight`, which is (out, in) with y = x @ W.T). The fused `qkv` output splits into
H query heads, then K key heads, then K value heads, each of E = head_size columns.

The file's metadata holds `format` ("dantinox-eqx"), `layout` and, when given, `config` (the
run's Config as JSON). LoRA adapters are merged before writing: the file is always a plain model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config, ConfigError
from ..data.tokenizer import save_tokenizer
from ..files import atomic_dir, atomic_path
from ..lora import has_lora, merge_lora
from ..model import Transformer, cast_floating
from . import checkpoint
from .chat_template import write_chat_template
from .layout import CONFIG_FILE, TOKENIZER_FILE

__all__ = ["to_safetensors", "safetensors_tensors", "export_run", "parse_dtype", "plain_model", "WEIGHTS_FILE"]

WEIGHTS_FILE = "model.safetensors"
LAYOUT = "Linear weights are (in, out): y = x @ W"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_dtype(dtype: Any) -> Any:
    """None, a dtype, or "float32" | "bfloat16" -> a jnp dtype (or None)."""
    if dtype is None or not isinstance(dtype, str):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: unknown export dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def plain_model(model: Any, dtype: Any = None) -> Any:
    """`model` with LoRA adapters merged and, when `dtype` is given, floating weights cast to it."""
    model = merge_lora(model) if has_lora(model) else model
    dtype = parse_dtype(dtype)
    return cast_floating(model, dtype) if dtype is not None else model


def safetensors_tensors(model: Any, dtype: Any = None) -> dict[str, np.ndarray]:
    """The {name: host array} mapping written by `to_safetensors` (names in the module doc)."""
    flat = checkpoint.flatten(eqx.filter(plain_model(model, dtype), eqx.is_array))
    tensors = {}
    for name, arr in flat.items():
        arr = np.asarray(jax.device_get(arr))
        if name.startswith("blocks."):
            rest = name[len("blocks."):]
            for i in range(arr.shape[0]):
                tensors[f"blocks.{i}.{rest}"] = np.ascontiguousarray(arr[i])
        else:
            tensors[name] = np.ascontiguousarray(arr)
    return tensors


def to_safetensors(model: Any, path: str | os.PathLike, dtype: Any = None, *,
                   config: Config | None = None) -> Path:
    """Write `model`'s weights (LoRA merged; cast to `dtype` when given) to `path`, atomically.

    `config`, when given, is stored as JSON in the metadata under "config". Returns the path.
    """
    from safetensors.numpy import save_file  # noqa: PLC0415 (only the export needs it)

    path = Path(path)
    metadata = {"format": "dantinox-eqx", "layout": LAYOUT}
    if config is not None:
        metadata["config"] = json.dumps(config.to_dict())
    tensors = safetensors_tensors(model, dtype)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _check_fits(model: Any, config: Config) -> None:
    """ConfigError unless `Transformer(config)` has exactly `model`'s array names and shapes."""
    like = jax.eval_shape(lambda: eqx.filter(Transformer(config, key=jax.random.key(0)), eqx.is_array))
    want = {k: tuple(v.shape) for k, v in checkpoint.flatten(like).items()}
    got = {k: tuple(np.shape(v)) for k, v in checkpoint.flatten(eqx.filter(model, eqx.is_array)).items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise ConfigError(f"config: the model's arrays do not match the config's shape fields "
                          f"(first differences: {diff}); export with the run's own config")


def export_run(model: Any, config: Config, tokenizer: Any, out_dir: str | os.PathLike,
               dtype: Any = None, *, step: int = 0, chat_template: str | None = None) -> Path:
    """Write a self-contained run directory at `out_dir` and return its path:

        config.yaml          `config` with use_lora: false and init_from: "" (no base run needed)
        tokenizer.json
        checkpoints/best/<step>/params, checkpoints/latest/<step>/params   (checkpoint.save)
        model.safetensors    the same weights, names in the module doc
        chat_template.jinja  `chat_template` (the run's: run/chat_template.read_chat_template), if any

    LoRA adapters are merged first; floating weights are cast to `dtype` ("float32" |
    "bfloat16" | None = as they are). The directory is built under a temporary name beside
    `out_dir` and renamed at the end, so an interrupted export leaves nothing half-written.
    Refuses (FileExistsError) an `out_dir` that exists and is not an empty directory.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"out_dir: {str(out)!r} exists and is not empty; export never "
                              f"overwrites, choose a new directory")
    plain = plain_model(model, dtype)
    # chat_template: the file travels inside the directory, not as a path to the source's
    config = config.replace(use_lora=False, init_from="", vocab_size=plain.vocab_size, chat_template=None)
    _check_fits(plain, config)
    params = eqx.filter(plain, eqx.is_array)
    with atomic_dir(out) as tmp:
        config.to_yaml(tmp / CONFIG_FILE)
        save_tokenizer(tokenizer, tmp / TOKENIZER_FILE)
        checkpoint.save(tmp, checkpoint.BEST, step, params)
        checkpoint.save(tmp, checkpoint.LATEST, step, params)
        to_safetensors(plain, tmp / WEIGHTS_FILE, config=config)
        if chat_template is not None:
            write_chat_template(tmp, chat_template)
    return out
