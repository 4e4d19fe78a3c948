"""GGUF (llama.cpp, ollama, LM Studio): import a .gguf file as a run, export a run as one.

    run = import_gguf("model.gguf", "runs/model")           # a run directory (generate, eval, fine-tune)
    model, config, tokenizer = from_gguf("model.gguf")      # or the model in memory
    export_gguf("runs/my_run", "my_run.gguf", dtype="q8_0")  # llama.cpp / transformers read it

Read and written with llama.cpp's own `gguf` package (numpy; no torch). Architectures: `llama`
(Mistral files are llama too), `qwen2`, `gpt2`, mapped onto the Hugging Face families of
`hf_format` (same Config fields, same checks); tensor names, the Q/K permutation and the
tokenizer metadata are in `gguf_format`.

Import dequantises every type `gguf.quants.dequantize` knows (F32, F16, BF16, Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, the K-quants, the IQ types) to float32 (or bfloat16); other types are refused naming
the tensor. The tokenizer must be byte-level BPE (`tokenizer.ggml.model` gpt2) with a `pre` of
gpt-2, smollm, llama-bpe or qwen2. The run directory is import_hf's (config.yaml, tokenizer.json,
checkpoints best + latest at step 0, hf_import.json with the special tokens) plus
chat_template.jinja when the file has `tokenizer.chat_template`.

Export writes one .gguf file (temporary name + rename): F32 norms and biases, the matrices in
f32 | f16 | bf16 | q8_0 (a matrix whose rows do not split into 32-value Q8_0 blocks stays f16,
as the converter does), `general.file_type`, the hyperparameters under llama.cpp's keys, and the
full tokenizer (tokens, token types, merges, pre, special ids, add_bos_token, chat_template from
RUN_DIR/chat_template.jinja or the init_from base run's). LoRA runs are merged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tokenizers import Tokenizer

from ..config import Config
from ..data.tokenizer import save_tokenizer
from ..files import atomic_write_text
from ..model import Transformer
from . import checkpoint
from .chat_template import write_chat_template
from .export import parse_dtype
from .gguf_export import EXPORT_DTYPES, export_gguf, to_gguf
from .gguf_format import (
    ARCHITECTURES,
    GGUFFormatError,
    gguf_name,
    needs_transpose,
    permuted_heads,
    tokenizer_from_gguf,
    unpermute,
)
from .hf import _check_new, _new_dir
from .hf_format import (
    IMPORT_FILE,
    TOKENIZER,
    HFFormatError,
    HFModel,
    config_from_hf,
    expanded_config,
    hf_tensors,
    our_arrays,
    parts_of,
    shapes_of,
)

__all__ = ["GGUFFormatError", "from_gguf", "import_gguf", "to_gguf", "export_gguf", "EXPORT_DTYPES"]


# --------------------------------------------------------------------------- reading a file
def _open(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata {key: value}, tensors {name: ReaderTensor}); GGUFFormatError naming the file when
    it is not a complete GGUF file or holds a tensor type gguf cannot dequantise."""
    import gguf  # noqa: PLC0415 (only GGUF paths need it)

    if not path.is_file():
        raise FileNotFoundError(f"FILE: {str(path)!r} does not exist")
    try:
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:  # noqa: BLE001 (the reader raises ValueError, KeyError, IndexError ... on bad bytes)
        raise GGUFFormatError(f"{path.name}: not a complete GGUF file ({type(e).__name__}: {e}); "
                              "re-download or re-export it") from None
    size = path.stat().st_size
    tensors = {}
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size:
            raise GGUFFormatError(f"{path.name}: tensor {t.name!r} ends past the end of the file ({size} bytes): "
                                  "the file is truncated")
        if not _can_dequantize(t.tensor_type):
            raise GGUFFormatError(f"{path.name}: tensor {t.name!r} has type {t.tensor_type.name}, which the gguf "
                                  "package cannot dequantise; convert the file with llama.cpp's llama-quantize")
        tensors[t.name] = t
    return meta, tensors


def _can_dequantize(qtype: Any) -> bool:
    """Whether gguf.quants.dequantize handles `qtype` (tried on one all-zero block)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants  # noqa: PLC0415

    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return True
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def _shape(t: Any) -> tuple[int, ...]:
    """A reader tensor's shape in numpy order (ggml lists the fastest axis first)."""
    return tuple(int(x) for x in reversed(t.shape.tolist()))


def _values(t: Any) -> np.ndarray:
    """A reader tensor dequantised to float32, numpy order."""
    from gguf import quants  # noqa: PLC0415

    return np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(_shape(t))


def _hf_like(meta: dict[str, Any], tensors: dict[str, Any], where: str) -> tuple[dict[str, Any], str]:
    """The Hugging Face config.json that the metadata describes (so `config_from_hf` validates it)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFFormatError(f"{where}: general.architecture is {arch!r}; supported: llama (Mistral files "
                              "are llama too), qwen2, gpt2")

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFFormatError(f"{where}: {arch}.{name} is missing; a {arch} file needs it")
        return value

    if "token_embd.weight" not in tensors:
        raise GGUFFormatError(f"{where}: tensor 'token_embd.weight' is missing")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or \
        _shape(tensors["token_embd.weight"])[0]
    D, H, L = key("embedding_length"), key("attention.head_count"), key("block_count")
    tied = "output.weight" not in tensors
    if arch == "gpt2":
        out, embd = tensors.get("output.weight"), tensors["token_embd.weight"]
        tied = out is None or (_shape(out) == _shape(embd) and np.array_equal(_values(out), _values(embd)))
        return {"model_type": "gpt2", "n_embd": D, "n_layer": L, "n_head": H, "n_positions": key("context_length"),
                "n_inner": key("feed_forward_length"), "layer_norm_epsilon": key("attention.layer_norm_epsilon"),
                "activation_function": "gelu_new", "vocab_size": vocab, "tie_word_embeddings": tied}, arch
    E = meta.get(f"{arch}.attention.key_length") or D // H
    if meta.get(f"{arch}.attention.value_length", E) != E:
        raise GGUFFormatError(f"{where}: {arch}.attention.value_length differs from key_length; ours are equal")
    rot = meta.get(f"{arch}.rope.dimension_count", E)
    if rot != E:
        raise GGUFFormatError(f"{where}: {arch}.rope.dimension_count={rot} is not the head size {E}; "
                              "partial RoPE has no equivalent here")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFFormatError(f"{where}: {arch}.rope.scaling.type is {scaling!r}; only plain RoPE imports")
    hf = {"model_type": arch, "hidden_size": D, "num_hidden_layers": L, "num_attention_heads": H,
          "num_key_value_heads": key("attention.head_count_kv", H), "head_dim": E,
          "intermediate_size": key("feed_forward_length"), "max_position_embeddings": key("context_length"),
          "rms_norm_eps": key("attention.layer_norm_rms_epsilon"), "rope_theta": key("rope.freq_base", 10000.0),
          "hidden_act": "silu", "vocab_size": vocab, "tie_word_embeddings": tied,
          "mlp_bias": "blk.0.ffn_up.bias" in tensors}
    if arch == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensors
    return hf, arch


def _load(path: str | os.PathLike, dtype: Any, max_context: int | None
          ) -> tuple[Transformer, Config, Tokenizer, dict[str, Any], str | None]:
    """Check everything, then read: (model with numpy arrays, config, tokenizer, hf_import.json
    record, chat template or None)."""
    path = Path(path)
    where = path.name
    meta, tensors = _open(path)
    hf, arch = _hf_like(meta, tensors, where)
    try:
        cfg, family = config_from_hf(hf, max_context=max_context)
    except HFFormatError as e:
        raise GGUFFormatError(f"{where}: {str(e).replace('config.json: ', '')}") from None
    tok, roles = tokenizer_from_gguf(meta, where)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise GGUFFormatError(f"{where}: {tok.get_vocab_size()} tokens, more than the {cfg.vocab_size} rows "
                              "of token_embd.weight")
    dtype = parse_dtype(dtype or "float32")
    cfg = cfg.replace(tokenizer_type="bpe", use_bf16=dtype == jnp.bfloat16)
    full = expanded_config(cfg, family)
    parts = parts_of(full, family)
    expected = jax.eval_shape(lambda p: hf_tensors(p, parts, full.num_blocks, 0),
                              checkpoint.flatten(shapes_of(full)[0]))
    names = {}
    for hf_name, want in expected.items():
        name = gguf_name(hf_name, arch)
        shape = tuple(reversed(want.shape)) if needs_transpose(name, arch) else tuple(want.shape)
        if name not in tensors:
            raise GGUFFormatError(f"{where}: tensor {name!r} is missing; the metadata describes a {arch} model "
                                  "that has it")
        if _shape(tensors[name]) != shape:
            raise GGUFFormatError(f"{where}: tensor {name!r} has shape {_shape(tensors[name])}, the metadata "
                                  f"implies {shape}")
        names[hf_name] = name
    # the converter writes GPT-2's tied head as a copy of token_embd (`_hf_like` compared them)
    copy = {"output.weight"} if arch == "gpt2" and cfg.weight_tying else set()
    extra = sorted(set(tensors) - set(names.values()) - copy)
    if extra:
        raise GGUFFormatError(f"{where}: tensor {extra[0]!r} has no place in the {arch} model the metadata "
                              f"describes ({len(extra)} such)")
    heads = (cfg.n_heads, cfg.effective_kv_heads)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == jnp.bfloat16 else np.dtype(np.float32)

    def get(hf_name: str) -> np.ndarray:
        name = names[hf_name]
        x = _values(tensors[name])
        n_head = permuted_heads(name, arch, *heads)
        x = unpermute(x, n_head) if n_head else x
        return (x.T if needs_transpose(name, arch) else x).astype(np_dtype)

    ours = our_arrays(get, parts, full.num_blocks, 0)
    if family == "gpt2":  # keep only the biases that are not all zero (an export of ours has none)
        flags = {"qkv_bias": ["blocks.attn.qkv_bias"], "o_bias": ["blocks.attn.o_bias"],
                 "mlp_bias": ["blocks.mlp.up_bias", "blocks.mlp.down_bias"]}
        keep = {flag: any(np.any(ours[n] != 0) for n in ns) for flag, ns in flags.items()}
        for flag, ns in flags.items():
            for n in ns if not keep[flag] else []:
                del ours[n]
        cfg = cfg.replace(**keep)
    like, static = shapes_of(cfg)
    model = eqx.combine(checkpoint.unflatten(ours, like), static)
    record = {"source": str(path.resolve()), "format": "gguf", "model_type": family,
              "special_tokens": {r: t for r, t in roles.items() if tok.token_to_id(t) is not None}}
    template = meta.get("tokenizer.chat_template")
    return model, cfg, tok, record, template if isinstance(template, str) else None


def from_gguf(path: str | os.PathLike, *, dtype: Any = "float32", max_context: int | None = None) -> HFModel:
    """The model of a .gguf file: (model, config, tokenizer).

    dtype "float32" (default) or "bfloat16" (config.use_bf16 set); quantised tensors are
    dequantised. max_context: the training window and KV-cache size of a RoPE model (default:
    `{arch}.context_length`); GPT-2's position table fixes it. GGUFFormatError (a ConfigError)
    names the file and the key or tensor that does not fit (module docstring).
    """
    model, cfg, tok, _, _ = _load(path, dtype, max_context)
    return HFModel(jax.tree.map(jnp.asarray, model), cfg, tok)


def import_gguf(path: str | os.PathLike, run_dir: str | os.PathLike, *, dtype: Any = "float32",
                max_context: int | None = None) -> Path:
    """Write the run directory `run_dir` (module docstring) from the .gguf file `path`; every
    check of `from_gguf` runs before anything is written. Returns its path."""
    run_dir = Path(run_dir)
    _check_new(run_dir, "RUN_DIR")
    model, cfg, tok, record, template = _load(path, dtype, max_context)
    params = eqx.filter(model, eqx.is_array)
    with _new_dir(run_dir, "RUN_DIR") as tmp:
        cfg.to_yaml(tmp / "config.yaml")
        save_tokenizer(tok, tmp / TOKENIZER)
        checkpoint.save(tmp, checkpoint.BEST, 0, params)
        checkpoint.save(tmp, checkpoint.LATEST, 0, params)
        atomic_write_text(tmp / IMPORT_FILE, json.dumps(record, indent=2) + "\n")
        if template is not None:
            write_chat_template(tmp, template)
    return run_dir
