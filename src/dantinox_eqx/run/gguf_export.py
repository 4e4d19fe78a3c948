"""Export a run as one .gguf file, as llama.cpp's `convert_hf_to_gguf.py` writes it (see
`run/gguf.py` for the whole picture and `gguf_format` for names, permutation and tokenizer).

    export_gguf("runs/my_run", "my_run.gguf", dtype="q8_0")

The output is a FILE path: refused (FileExistsError naming OUT) when it exists and is not an
empty file, so nothing is ever overwritten; written under a temporary name beside it and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
from tokenizers import Tokenizer

from ..config import Config, ConfigError
from ..data.tokenizer import load_tokenizer
from ..files import atomic_path
from ..model import rope_base
from . import checkpoint
from .chat_template import read_chat_template
from .export import plain_model
from .gguf_format import (
    FILE_TYPES,
    GGUFFormatError,
    gguf_name,
    gguf_vocab,
    needs_transpose,
    permute,
    permuted_heads,
)
from .hf import run_special_tokens
from .hf_format import TOKENIZER, HFFormatError, expanded_config, hf_model_type, hf_tensors, parts_of, shapes_of
from .pretrained import from_pretrained, load_config

__all__ = ["to_gguf", "export_gguf", "gguf_architecture", "EXPORT_DTYPES"]

EXPORT_DTYPES = tuple(FILE_TYPES)  # f32, f16, q8_0, bf16


def gguf_architecture(cfg: Config) -> str:
    """llama.cpp's architecture for `cfg` (llama / qwen2 / gpt2, as `hf_model_type` picks the
    family), or GGUFFormatError naming the first field that none of them expresses."""
    try:
        family = hf_model_type(cfg)
    except HFFormatError as e:
        message = str(e).replace("Hugging Face's llama / mistral / qwen2 / mixtral / gpt2", "llama.cpp's llama / "
                                 "qwen2 / gpt2").replace("--format hf", "--format gguf")
        raise GGUFFormatError(message) from None
    if family == "mistral":
        raise GGUFFormatError("sliding_window: llama.cpp's llama architecture has no sliding window, so this run "
                              "does not export in --format gguf")
    if family == "mixtral":
        raise GGUFFormatError("use_moe: --format gguf writes dense llama / qwen2 / gpt2 models only")
    if family == "gpt2" and cfg.activation != "gelu":
        raise GGUFFormatError(f"activation: llama.cpp's gpt2 uses GELU, not {cfg.activation}, so this run does not "
                              "export in --format gguf")
    return family


def _check_new_file(out: Path) -> None:
    if out.is_dir() or (out.exists() and out.stat().st_size > 0):
        raise FileExistsError(f"OUT: {str(out)!r} exists and is not an empty file; nothing is overwritten, "
                              "choose a new file name (e.g. model.gguf)")


def _check_dtype(dtype: str) -> None:
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not a GGUF export type; choose one of {', '.join(EXPORT_DTYPES)}")


def _stored(x: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw ggml type or None) for one tensor: vectors (norms, biases) F32, matrices `dtype`."""
    from gguf import GGMLQuantizationType as Q  # noqa: PLC0415 (only GGUF paths need it)
    from gguf import quants  # noqa: PLC0415

    if x.ndim == 1 or dtype == "f32":
        return x.astype(np.float32), None
    if dtype == "bf16":
        return quants.quantize(x, Q.BF16), Q.BF16
    if dtype == "q8_0" and x.shape[-1] % 32 == 0:
        return quants.quantize(x, Q.Q8_0), Q.Q8_0
    return x.astype(np.float16), None  # f16, or a q8_0 row that does not split into 32-value blocks


def to_gguf(model: Any, config: Config, tokenizer: Tokenizer, out_path: str | os.PathLike, *, dtype: str = "f32",
            special_tokens: dict[str, str] | None = None, chat_template: str | None = None,
            name: str | None = None) -> Path:
    """Write `model` (LoRA merged) under `config` with `tokenizer` as the GGUF file `out_path`.

    dtype: the matrices' type, "f32" | "f16" | "bf16" | "q8_0" (norms and biases are F32).
    special_tokens: {"eos_token": "<|endoftext|>", ...} (written as tokenizer.ggml.*_token_id).
    GGUFFormatError naming the field when llama.cpp cannot express the model or the tokenizer;
    FileExistsError when `out_path` is taken. Nothing half-written.
    """
    import gguf  # noqa: PLC0415

    out = Path(out_path)
    _check_new_file(out)
    _check_dtype(dtype)
    plain = plain_model(model)
    cfg = config.replace(use_lora=False, init_from="", vocab_size=plain.vocab_size)
    arch = gguf_architecture(cfg)
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)
    full = expanded_config(cfg, arch)
    ours = {k: np.asarray(jax.device_get(v), np.float32)
            for k, v in checkpoint.flatten(eqx.filter(plain, eqx.is_array)).items()}
    if full != cfg:  # GPT-2 biases the run does not have: zeros
        ours |= {n: np.zeros(s.shape, np.float32) for n, s in checkpoint.flatten(shapes_of(full)[0]).items()
                 if n not in ours}
    tensors = {}
    for hf_name, x in hf_tensors(ours, parts_of(full, arch), cfg.num_blocks, 0).items():
        g = gguf_name(hf_name, arch)
        x = x.T if needs_transpose(g, arch) else x
        n_head = permuted_heads(g, arch, cfg.n_heads, cfg.effective_kv_heads)
        tensors[g] = np.ascontiguousarray(permute(x, n_head) if n_head else x)
    if arch == "gpt2" and "output.weight" not in tensors:  # the converter writes GPT-2's tied head as a copy
        tensors["output.weight"] = tensors["token_embd.weight"]

    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name or "dantinox-eqx")
    writer.add_type("model")
    writer.add_block_count(cfg.num_blocks)
    writer.add_context_length(cfg.max_context)
    writer.add_embedding_length(cfg.dim)
    writer.add_feed_forward_length(cfg.mlp_width)
    writer.add_head_count(cfg.n_heads)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_head_count_kv(cfg.effective_kv_heads)
        writer.add_rope_freq_base(rope_base(cfg.head_size, cfg.rope_scale_factor, cfg.effective_rope_theta))
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_key_length(cfg.head_size)
        writer.add_value_length(cfg.head_size)
        if arch == "llama":
            writer.add_vocab_size(cfg.vocab_size)
            writer.add_rope_dimension_count(cfg.head_size)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["token_type"])
    writer.add_token_merges(vocab["merges"])
    ids = {role: tokenizer.token_to_id(t) for role, t in (special_tokens or {}).items()}
    if ids.get("bos_token") is None and vocab["bos_id"] is not None:
        ids["bos_token"] = vocab["bos_id"]
    for role, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                      ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        if ids.get(role) is not None:
            add(ids[role])
    writer.add_add_bos_token(vocab["add_bos_token"])
    if chat_template:
        writer.add_chat_template(chat_template)
    for g, x in tensors.items():
        data, raw = _stored(x, dtype)
        writer.add_tensor(g, data, raw_dtype=raw)
    with atomic_path(out) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def export_gguf(run_dir: str | os.PathLike, out_path: str | os.PathLike, *, dtype: str | None = None) -> Path:
    """`to_gguf` for a run directory (best checkpoint; a LoRA run merged; dtype None = "bf16" for
    a use_bf16 run, else "f32"): refuses a taken `out_path`, a config or tokenizer llama.cpp
    cannot express, before loading any weights."""
    run_dir, out = Path(run_dir), Path(out_path)
    _check_new_file(out)
    config = load_config(run_dir)
    dtype = dtype or ("bf16" if config.use_bf16 else "f32")
    _check_dtype(dtype)
    gguf_architecture(config.replace(use_lora=False))
    tokenizer = load_tokenizer(run_dir / TOKENIZER)
    gguf_vocab(tokenizer, max(config.vocab_size or 0, tokenizer.get_vocab_size()))
    model = from_pretrained(run_dir, merge_lora=True)
    return to_gguf(model, config, tokenizer, out, dtype=dtype, special_tokens=run_special_tokens(run_dir, tokenizer),
                   chat_template=read_chat_template(run_dir), name=run_dir.resolve().name)
