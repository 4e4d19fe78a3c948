"""The prepared dataset's directory format, in one place: its file names, index.json and reading it.

A prepared dataset (`dantinox-eqx prepare`, data/prepare.py writes it; data/tokens.py reads it):

    index.json        written last, atomically: the dataset exists once it does
    tokenizer.json    the tokenizer the ids come from (Hugging Face `tokenizers` format)
    shard_00000.bin   raw little-endian token ids, uint16 when vocab_size <= 65535 else uint32,
    shard_00001.bin   no header (`np.memmap(path, dtype)`); the token stream is the shards in order
    .progress.json    only while a prepare is unfinished: its resume point

index.json: {"format": "dantinox-eqx-tokens", "version": 1, "dtype", "vocab_size", "eot_id",
"tokenizer_sha256" (of tokenizer.json's bytes), "source": {"kind", "spec", "text_field",
"sha256"}, "shards": [{"file", "tokens", "documents", "bytes"}], "total_tokens",
"total_documents", "total_bytes", "prepare": {the settings used, `source_stat`}}. `bytes`
counts the UTF-8 bytes of the text encoded into a shard (bits per byte need them);
`documents` the documents that end in it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..files import sha256_file
from .sampling import DataError

__all__ = ["FORMAT", "VERSION", "INDEX_FILE", "TOKENIZER_FILE", "PROGRESS_FILE", "DTYPES", "VERSIONS", "dtype_name",
           "is_prepared", "read_index"]

FORMAT, VERSION = "dantinox-eqx-tokens", 1
VERSIONS = (1, 2)  # 2: chat data, each shard with a loss-mask "flags_file" (data/chat_prepare.py)
INDEX_FILE, TOKENIZER_FILE, PROGRESS_FILE = "index.json", "tokenizer.json", ".progress.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def dtype_name(vocab_size: int) -> str:
    """The shards' dtype for a vocabulary of `vocab_size` ids: the smallest that holds them."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max else "uint32"


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether `path` is a finished prepared dataset (a folder with index.json)."""
    return (Path(path) / INDEX_FILE).is_file()


def read_index(path: str | os.PathLike, field: str = "data_path") -> dict[str, Any]:
    """The validated index.json of the prepared dataset `path`. Checks the format, that every
    shard file exists with exactly `tokens * itemsize` bytes (a stat, nothing is read) and
    that tokenizer.json matches `tokenizer_sha256`; DataError naming `field` and the file otherwise."""
    path = Path(path)
    index_file = path / INDEX_FILE
    again = "prepare the dataset again (dantinox-eqx prepare)"
    if not index_file.is_file():
        unfinished = (path / PROGRESS_FILE).is_file()
        why = "an unfinished prepare (no index.json yet): run the same prepare again to finish it" if unfinished \
            else "a folder without index.json, not a prepared dataset: prepare it first (dantinox-eqx prepare)"
        raise DataError(f"{field}: {str(path)!r} is {why}")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        shards = index["shards"]
        dtype = np.dtype(DTYPES[index["dtype"]])
        if index["format"] != FORMAT or index["version"] not in VERSIONS:
            raise ValueError(f"format {index['format']!r} version {index['version']!r}")
        if not shards or sum(int(s["tokens"]) for s in shards) != int(index["total_tokens"]):
            raise ValueError("its shards' tokens do not add up to total_tokens")
        digest = str(index["tokenizer_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{field}: {str(index_file)!r} is not a {FORMAT} v{VERSION} index ({e}); {again}") from None
    for s in shards:
        shard = path / s["file"]
        if Path(s["file"]).name != s["file"]:
            raise DataError(f"{field}: {str(index_file)!r} names shard {s['file']!r} outside its folder; {again}")
        if not shard.is_file():
            raise DataError(f"{field}: shard {str(shard)!r} listed in index.json is missing; {again}")
        want = int(s["tokens"]) * dtype.itemsize
        if shard.stat().st_size != want:
            raise DataError(f"{field}: shard {str(shard)!r} has {shard.stat().st_size} bytes, index.json says "
                            f"{s['tokens']} tokens = {want} bytes; {again}")
        flags = path / str(s.get("flags_file", ""))
        if "flags_file" in s and (Path(s["flags_file"]).name != s["flags_file"] or not flags.is_file()
                                  or flags.stat().st_size != int(s["tokens"])):
            raise DataError(f"{field}: the loss-mask file {str(flags)!r} is missing or not {s['tokens']} bytes; "
                            f"{again}")
    tok_file = path / TOKENIZER_FILE
    if not tok_file.is_file() or sha256_file(tok_file) != digest:
        what = "is missing" if not tok_file.is_file() else "does not match tokenizer_sha256 in index.json"
        raise DataError(f"{field}: {str(tok_file)!r} {what}; {again}")
    return index
