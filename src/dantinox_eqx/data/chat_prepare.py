"""Chat JSONL -> a prepared dataset with a loss-mask stream (issue 23; format: tokens.py).

    prepare_chat("chat.jsonl", "data/chat.tokens", tokenizer, template, train_on="assistant")

Rows (chat_data.py) are streamed one line at a time and written as the text format's shards
(`shard_NNNNN.bin`, token ids) plus, per shard, `shard_NNNNN.flags.bin`: one uint8 per token,
the bits TRAINED (the token is a trained target) and STARTS (the token starts an example; the
segment boundaries of packed windows). index.json is version 2: version 1's fields, each shard
with "flags_file" and "trained_tokens", its "bytes" the UTF-8 bytes of the TRAINED text (bits
per byte are over the trained tokens), and "chat": {"train_on", "template_sha256", "examples",
"trained_tokens"}. Each row is rendered once where the template's layout allows (chat_spans.py).
Memory: one batch of rendered rows (`BATCH_CHARS` of text) and its ids (benchmarks/
chat_prepare_memory.py: 400 MB of chat JSONL, 236 MB peak RSS; the same text as plain JSONL,
281 MB). The whole dataset is written in a temporary folder renamed at the
end: a malformed row (DataError naming its line and field) leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..files import atomic_dir
from . import tokenizer as tk
from .chat_data import TRAIN_ON, encode_examples, parse_row, special_tokens
from .chat_spans import SpanFinder
from .sampling import DataError

__all__ = ["CHAT_VERSION", "prepare_chat", "is_chat_jsonl", "chat_cache_dir"]

CHAT_VERSION = 2
SHARD_TOKENS = 1 << 27
BATCH_CHARS = 1 << 20  # text encoded per batch: bounded memory, the tokenizer's threads busy


def is_chat_jsonl(path: str | os.PathLike) -> bool:
    """Whether `path` is a .jsonl file whose first row is chat data (messages or prompt/completion)."""
    p = Path(path)
    if not (p.is_file() and p.name.lower().endswith(".jsonl")):
        return False
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(row, dict) and ("messages" in row or ("prompt" in row and "completion" in row))
    return False


def chat_cache_dir(source: Path, cache_root: Path, tokenizer: Tokenizer, template: str | None, train_on: str) -> Path:
    """Where `train --data_path chat.jsonl` keeps the prepared dataset: keyed by the file (path,
    size, mtime), the tokenizer, the template and train_on (any change prepares it again)."""
    st = source.stat()
    key = hashlib.sha256(json.dumps([str(source.absolute()), st.st_size, st.st_mtime_ns, tk.digest(tokenizer),
                                     template, train_on]).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.name)
    return cache_root / "prepared" / f"{safe}.chat-{key}"


class _Writer:
    def __init__(self, out: Path, dtype: Any):
        self.out, self.dtype = out, dtype
        self.shards: list[dict[str, Any]] = []
        self._open()

    def _open(self) -> None:
        n = len(self.shards)
        self.entry = {"file": f"shard_{n:05d}.bin", "flags_file": f"shard_{n:05d}.flags.bin", "tokens": 0,
                      "documents": 0, "bytes": 0, "trained_tokens": 0}
        self.f_ids = open(self.out / self.entry["file"], "wb")
        self.f_flags = open(self.out / self.entry["flags_file"], "wb")

    def add(self, ids: np.ndarray, flags: np.ndarray, trained_bytes: int) -> None:
        self.f_ids.write(ids.astype(np.dtype(self.dtype).newbyteorder("<")).tobytes())
        self.f_flags.write(flags.tobytes())
        e = self.entry
        e["tokens"] += len(ids)
        e["documents"] += 1
        e["bytes"] += trained_bytes
        e["trained_tokens"] += int(np.count_nonzero(flags & 1))
        if e["tokens"] >= SHARD_TOKENS:
            self.close()
            self._open()

    def close(self) -> None:
        self.f_ids.close()
        self.f_flags.close()
        self.shards.append(self.entry)


def prepare_chat(source: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Tokenizer, template: str | None,
                 train_on: str = "assistant", field: str = "data_path") -> Path:
    """Prepare the chat JSONL `source` into `out_dir` (see the module docstring); returns it.
    A finished `out_dir` is kept as it is. DataError (naming `field`, the line and the row's
    field) for bad input, with nothing written."""
    source, out = Path(source), Path(out_dir)
    if (out / "index.json").is_file():
        return out
    if train_on not in TRAIN_ON:
        raise DataError(f"train_on: {train_on!r} is not one of {', '.join(TRAIN_ON)}")
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    spans_of = SpanFinder(template, special_tokens(tokenizer))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        writer = _Writer(tmp, dtype)
        try:
            with open(source, encoding="utf-8") as f:
                batch, size = [], 0  # rows rendered, encoded together every BATCH_CHARS of text
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{field}: {source.name} line {lineno}"
                    text, spans = spans_of(parse_row(line, where), where)
                    batch.append((text, spans, where))
                    size += len(text)
                    if size >= BATCH_CHARS:
                        for example in encode_examples(tokenizer, batch, train_on):
                            writer.add(*example)
                        batch, size = [], 0
                for example in encode_examples(tokenizer, batch, train_on):
                    writer.add(*example)
        except UnicodeDecodeError as e:
            raise DataError(f"{field}: {str(source)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        finally:
            writer.close()
        shards = [s for s in writer.shards if s["tokens"] > 0] or writer.shards[:1]
        for s in writer.shards:
            if s not in shards:
                (tmp / s["file"]).unlink()
                (tmp / s["flags_file"]).unlink()
        examples = sum(s["documents"] for s in shards)
        if examples == 0:
            raise DataError(f"{field}: {str(source)!r} holds no rows")
        tk.save_tokenizer(tokenizer, tmp / "tokenizer.json")
        index = {"format": "dantinox-eqx-tokens", "version": CHAT_VERSION, "dtype": np.dtype(dtype).name,
                 "vocab_size": vocab, "eot_id": tk.eot_id(tokenizer),
                 "tokenizer_sha256": hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest(),
                 "source": {"kind": "chat", "spec": str(source.absolute())},
                 "shards": shards, "total_tokens": sum(s["tokens"] for s in shards), "total_documents": examples,
                 "total_bytes": sum(s["bytes"] for s in shards),
                 "chat": {"train_on": train_on, "examples": examples,
                          "trained_tokens": sum(s["trained_tokens"] for s in shards),
                          "template_sha256": None if template is None
                          else hashlib.sha256(template.encode()).hexdigest()}}
        (tmp / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return out
