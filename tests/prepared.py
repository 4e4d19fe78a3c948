"""Write prepared datasets (the format in `dantinox_eqx/data/tokens.py`) for tests and benchmarks,
without `dantinox-eqx prepare`: the training side is tested on its own.

    tok = char_tokenizer_with_eot(text)
    write_prepared(tmp / "ds", ["doc one", "doc two"], tok, shard_tokens=1000)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from dantinox_eqx.config import atomic_write_text
from dantinox_eqx.data.tokenizer import char_tokenizer, save_tokenizer
from dantinox_eqx.data.tokens import FORMAT, INDEX_FILE, TOKENIZER_FILE, VERSION

EOT = "<|endoftext|>"


def char_tokenizer_with_eot(text: str) -> Tokenizer:
    """The char tokenizer of `text` plus an end-of-text special token (the last id)."""
    tok = char_tokenizer(text)
    tok.add_special_tokens([EOT])
    return tok


def dtype_for(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.get_vocab_size() <= 65535 else np.uint32)


def write_index(out: Path, shards: list[dict[str, Any]], tok: Tokenizer, source: str = "test") -> Path:
    """Write tokenizer.json, then index.json (last) for shard files already in `out`:
    `shards` = [{"file", "tokens", "documents", "bytes"}, ...]."""
    save_tokenizer(tok, out / TOKENIZER_FILE)
    digest = hashlib.sha256((out / TOKENIZER_FILE).read_bytes()).hexdigest()
    index = {"format": FORMAT, "version": VERSION, "dtype": dtype_for(tok).name, "vocab_size": tok.get_vocab_size(),
             "eot_id": tok.token_to_id(EOT), "tokenizer_sha256": digest,
             "source": {"kind": "text", "spec": source, "text_field": None, "sha256": "0" * 64},
             "shards": shards, "total_tokens": sum(s["tokens"] for s in shards),
             "total_documents": sum(s["documents"] for s in shards), "total_bytes": sum(s["bytes"] for s in shards)}
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return out


def write_prepared(out: Path, docs: list[str], tok: Tokenizer, shard_tokens: int = 1 << 27) -> Path:
    """Encode `docs` (each followed by the end-of-text id) into shards cut at document
    boundaries once they reach `shard_tokens`, as prepare does. Returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    eot = tok.token_to_id(EOT)
    shards: list[dict[str, Any]] = []
    ids: list[int] = []
    n_docs = n_bytes = 0

    def flush() -> None:
        nonlocal ids, n_docs, n_bytes
        name = f"shard_{len(shards):05d}.bin"
        np.asarray(ids, dtype_for(tok)).tofile(out / name)
        shards.append({"file": name, "tokens": len(ids), "documents": n_docs, "bytes": n_bytes})
        ids, n_docs, n_bytes = [], 0, 0

    for doc in docs:
        ids += tok.encode(doc).ids + [eot]
        n_docs, n_bytes = n_docs + 1, n_bytes + len(doc.encode("utf-8"))
        if len(ids) >= shard_tokens:
            flush()
    if ids:
        flush()
    return write_index(out, shards, tok)


def write_ids(out: Path, ids: np.ndarray, shard_tokens: int = 1 << 27) -> Path:
    """Token ids (e.g. random ones) as a prepared dataset: shards of `shard_tokens`, one
    "document" each, one byte per token, with a char tokenizer of max(ids) + 1 symbols."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, a in enumerate(range(0, len(ids), shard_tokens)):
        name, part = f"shard_{i:05d}.bin", ids[a:a + shard_tokens]
        part.astype(np.uint16).tofile(out / name)
        shards.append({"file": name, "tokens": len(part), "documents": 1, "bytes": len(part)})
    return write_index(out, shards, char_tokenizer_with_eot("".join(chr(0x100 + i) for i in range(int(ids.max()) + 1))))


def split_docs(text: str, n: int) -> list[str]:
    """`text` cut into `n` documents at line ends (roughly equal sizes)."""
    lines = text.splitlines(keepends=True)
    step = max(1, len(lines) // n)
    return ["".join(lines[i:i + step]) for i in range(0, len(lines), step)]
