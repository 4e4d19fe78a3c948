"""The GGUF format as data: tensor names, llama.cpp's Q/K row permutation, metadata keys, and the
byte-level BPE tokenizer as `tokenizer.ggml.*` metadata <-> a `tokenizers` tokenizer.json.

`run/gguf.py` reads and writes files with it. Everything mirrors what llama.cpp's own converter
(`convert_hf_to_gguf.py`) writes, so a file of ours loads in llama.cpp and a file of theirs here.

Tensors (numpy order = ggml's shape reversed; weights of a Linear are (out, in), as PyTorch's):

    Hugging Face (hf_format)                  GGUF
    model.embed_tokens / transformer.wte      token_embd.weight
    transformer.wpe                           position_embd.weight
    model.norm / transformer.ln_f             output_norm.{weight,bias}
    lm_head                                   output.weight (llama / qwen2: absent when tied;
                                              gpt2: always written, a copy of token_embd when tied)
    layers.{i}.input_layernorm / h.{i}.ln_1   blk.{i}.attn_norm.{weight,bias}
    post_attention_layernorm / ln_2           blk.{i}.ffn_norm.{weight,bias}
    self_attn.{q,k,v,o}_proj                  blk.{i}.attn_{q,k,v,output}.{weight,bias}
    mlp.{gate,up,down}_proj                   blk.{i}.ffn_{gate,up,down}.{weight,bias}
    attn.c_attn / attn.c_proj (Conv1D, in-out) blk.{i}.attn_qkv / attn_output (transposed: out-in)
    mlp.c_fc / mlp.c_proj                     blk.{i}.ffn_up / ffn_down (transposed)

llama.cpp's `llama` architecture applies RoPE to adjacent pairs (x0, x1), (x2, x3) ... where
Hugging Face and we rotate the two halves of a head; its converter therefore permutes the rows of
attn_q / attn_k (weights and biases) head by head (`LlamaModel.permute`), and `unpermute` undoes
it. `qwen2` uses the half-rotation itself (no permutation); `gpt2` has no RoPE.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..config import ConfigError

ARCHITECTURES = ("llama", "qwen2", "gpt2")
# llama.cpp's token types (SentencePieceTokenTypes in convert_hf_to_gguf.py).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# general.file_type (gguf.LlamaFileType) of each export dtype.
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


class GGUFFormatError(ConfigError):
    """A GGUF file or a run that cannot be converted; the message names the file, key or field."""


# --------------------------------------------------------------------------- names
_LAYER_HF = {
    "llama": {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"},
    "gpt2": {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
}
_TOP_HF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
           "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}
_LAYER_RE = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.(.+)\.(weight|bias)$")
# GPT-2's Conv1D weights are (in, out) in Hugging Face files, (out, in) in GGUF.
CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")


def gguf_name(hf: str, arch: str) -> str:
    """The GGUF tensor name of a Hugging Face tensor name (llama / qwen2 / gpt2)."""
    m = _LAYER_RE.match(hf)
    if m:
        block, inner, kind = m.groups()
        return f"blk.{block}.{_LAYER_HF['gpt2' if arch == 'gpt2' else 'llama'][inner]}.{kind}"
    stem, kind = hf.rsplit(".", 1)
    return f"{_TOP_HF[stem]}.{kind}"


def needs_transpose(name: str, arch: str) -> bool:
    """Whether the GGUF tensor `name` is the transpose of its Hugging Face tensor (GPT-2 Conv1D)."""
    return arch == "gpt2" and name.endswith(".weight") and name.split(".")[-2] in CONV1D


def permuted_heads(name: str, arch: str, n_heads: int, n_kv_heads: int) -> int | None:
    """The head count `LlamaModel.permute` uses for `name`, or None when it is not permuted."""
    if arch != "llama":
        return None
    part = name.split(".")[-2] if name.startswith("blk.") else ""
    return {"attn_q": n_heads, "attn_k": n_kv_heads}.get(part)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: each head's rows (first half, second half) interleaved
    into pairs. w: (n_head * E, ...) -> same shape."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- tokenizer
# llama.cpp's pre-tokenizers (src/llama-vocab.cpp, llm_tokenizer_bpe) for `tokenizer.ggml.pre`.
# `gpt-2` and `smollm` split with the GPT-2 regex ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
# ?[^\s\p{L}\p{N}]+|\s+(?!\S), whose final `|\s+` is implied: llama.cpp keeps what no alternative
# matches as a piece of its own), which is exactly `tokenizers`' ByteLevel regex; smollm first
# isolates every digit (\p{N}). llama-bpe and qwen2 are llama.cpp's regexes verbatim.
LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTES_ONLY = {**_BYTE_LEVEL, "use_regex": False}


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), _BYTES_ONLY]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), _BYTES_ONLY]},
}
# The same pre-tokenizers as Hugging Face's own tokenizer.json files spell them (an import-hf of
# Llama 3 / Qwen2 keeps theirs): recognised on export too.
_HF_SPELLINGS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _normal_pre(pre: dict[str, Any] | None) -> Any:
    """A pre-tokenizer JSON with only the fields that decide the split (for comparison)."""
    if pre is None:
        return None
    kind = pre.get("type")
    if kind == "Sequence":
        return ("Sequence", tuple(_normal_pre(p) for p in pre.get("pretokenizers", [])))
    if kind == "ByteLevel":
        return ("ByteLevel", bool(pre.get("add_prefix_space")), bool(pre.get("use_regex", True)))
    if kind == "Digits":
        return ("Digits", bool(pre.get("individual_digits")))
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return ("Split", pattern.get("Regex", pattern.get("String")), str(pre.get("behavior")).lower(),
                bool(pre.get("invert")))
    return (kind,)


_KNOWN_PRE = {_normal_pre(p): name for name, p in PRE_TOKENIZERS.items()} | {
    _normal_pre({"type": "Sequence", "pretokenizers": [_split(regex), _BYTES_ONLY]}): name
    for name, regex in _HF_SPELLINGS.items()}


def tokenizer_from_gguf(meta: dict[str, Any], where: str) -> tuple[Tokenizer, dict[str, str]]:
    """(tokenizer, {role: token}) from a GGUF's `tokenizer.ggml.*` metadata (byte-level BPE,
    `tokenizer.ggml.model` "gpt2"); GGUFFormatError naming the key for anything else."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFFormatError(f"{where}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') imports "
                              "(SentencePiece 'llama', 'bert', 't5' ... vocabularies do not)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFFormatError(f"{where}: tokenizer.ggml.pre is {pre!r}; supported: {', '.join(PRE_TOKENIZERS)}")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise GGUFFormatError(f"{where}: tokenizer.ggml.{'tokens' if not tokens else 'merges'} is missing")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFFormatError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries, "
                              f"tokenizer.ggml.tokens {len(tokens)}")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": int(k) == CONTROL} for i, (t, k) in enumerate(zip(tokens, types)) if int(k) in (CONTROL,
                                                                                                        USER_DEFINED)]
    roles = {}
    for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"),
                      ("unk_token", "unknown_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None:
            if not 0 <= int(i) < len(tokens):
                raise GGUFFormatError(f"{where}: tokenizer.ggml.{key}={i} is outside the {len(tokens)} tokens")
            roles[role] = tokens[int(i)]
    post: dict[str, Any] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    if meta.get("tokenizer.ggml.add_bos_token") and "bos_token" in roles:
        bos = roles["bos_token"]
        bos_id = tokens.index(bos)
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": PRE_TOKENIZERS[pre], "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      # llama.cpp skips the merges for a word that is a token (llama-bpe only)
                      "ignore_merges": pre == "llama-bpe",
                      "vocab": {t: i for i, t in enumerate(tokens)},
                      "merges": [m.split(" ", 1) for m in merges]}}
    if len(spec["model"]["vocab"]) != len(tokens):
        raise GGUFFormatError(f"{where}: tokenizer.ggml.tokens holds duplicate tokens")
    try:
        return Tokenizer.from_str(json.dumps(spec)), roles
    except Exception as e:  # noqa: BLE001 (the library raises plain Exceptions)
        raise GGUFFormatError(f"{where}: tokenizer.ggml.* does not form a valid tokenizer: {e}") from None


def gguf_vocab(tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """`tokenizer.ggml.*` values for our tokenizer (`model`, `pre`, `tokens`, `token_type`,
    `merges`, `add_bos_token`, and `bos_id` when a post-processor adds one), padded to
    `vocab_size` with `[PAD{i}]` (UNUSED) as the converter pads. GGUFFormatError with the reason
    when llama.cpp cannot tokenize as `tok` does (char vocabularies, other pre-tokenizers)."""
    spec = json.loads(tok.to_str())
    model = spec.get("model", {})
    if model.get("type") == "WordLevel":
        raise GGUFFormatError("tokenizer_type: a char tokenizer has no merges and no byte alphabet; llama.cpp "
                              "tokenizes only byte-level BPE, so train with tokenizer_type: bpe to export GGUF")
    dec = spec.get("decoder") or {}
    if model.get("type") != "BPE" or dec.get("type") != "ByteLevel" or model.get("byte_fallback"):
        raise GGUFFormatError(f"tokenizer.json: a {model.get('type')} model with a {dec.get('type')} decoder; "
                              "llama.cpp's gpt2 tokenizer is byte-level BPE only")
    if spec.get("normalizer") is not None:
        raise GGUFFormatError("tokenizer.json: normalizer is set; llama.cpp's byte-level BPE has none")
    pre = _KNOWN_PRE.get(_normal_pre(spec.get("pre_tokenizer")))
    if pre is None:
        raise GGUFFormatError("tokenizer.json: pre_tokenizer matches none of llama.cpp's "
                              f"({', '.join(PRE_TOKENIZERS)}); it would split text differently there")
    vocab = tok.get_vocab(with_added_tokens=True)
    n = max(vocab_size, max(vocab.values()) + 1)
    if n > vocab_size:
        raise GGUFFormatError(f"vocab_size: the tokenizer has ids up to {n - 1}, the model only {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, NORMAL
    for i, t in tok.get_added_tokens_decoder().items():
        types[i] = CONTROL if t.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise GGUFFormatError("tokenizer.json: the BPE model has no merges; llama.cpp needs tokenizer.ggml.merges")
    post = spec.get("post_processor") or {}
    bos_id = None
    if post.get("type") == "TemplateProcessing" and "SpecialToken" in (post.get("single") or [{}])[0]:
        bos_id = vocab.get(post["single"][0]["SpecialToken"]["id"])
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges,
            "add_bos_token": bos_id is not None, "bos_id": bos_id}
