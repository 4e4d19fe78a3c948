"""Token streams for training: prepared datasets (shards of token ids) and the batch feeds.

A prepared dataset is a directory written by `dantinox-eqx prepare` (its format: data/index.py,
whose `read_index` checks it). The token stream is the shards concatenated in order.
`open_splits` opens them read-only and splits the stream (nothing is read until a window is):
validation is its last `val_fraction` (global token index), or a separate `val_path` (a
prepared directory or a text file). A raw text file keeps `data.prepare_data`'s path (a
cached `.tokens.npy`), wrapped in the same `Splits`.

Two feeds turn a split into the batches of step s (`feeds.make_feed`; `feeds.choose_feed` picks one):

- fused: the token array is placed whole on every device and the step samples its windows
  inside the compiled call (`data.sample_batch`, keys `fold_in(data_key, s)`): the fastest for
  a small raw-text corpus (one dispatch per step), but device memory O(corpus).
- host: window starts are drawn on the host with a counter-based RNG (Philox keyed by the JAX
  key's data, counter = (0, 0, s, stream)), so the batch of step s is a pure function of
  (seed, s): resume stays exact. Each process reads only the rows of the global batch that its
  own devices hold (`distributed.local_rows`), from the shard files, and a background thread
  reads and places the batches of the next steps (depth 2) while the device computes.
  Device memory O(batch). Used for every prepared dataset and for token arrays over
  FUSED_MAX_BYTES.

Shards are read with positional reads (`os.pread`, one per window), not memory-mapped: a
memory map counts every page it touches as resident memory of the process, and the kernel
maps whole page-cache folios per fault; measured here, 1200 random 65-token windows of a
400 MB shard set made 348 MB resident (RSS then grows towards the corpus size as training
samples it). Read with pread the pages stay in the page cache (the kernel's, reclaimable)
and the process's memory is O(batch) whatever the corpus size (benchmarks/README.md).

Bits per byte: `loss / ln 2 * tokens / bytes` of a split. A prepared split's bytes come from
index.json's per-shard `bytes`, prorated by tokens where a split cuts a shard; a raw text
split's bytes are counted exactly, token by token (`token_byte_lengths`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Int
from tokenizers import Tokenizer

from ..config import Config
from ..files import cache_dir as default_cache_dir
from . import tokenizer as tk
from .cached import needs_prepare, prepared_source
from .chat_prepare import chat_cache_dir, is_chat_jsonl, prepare_chat
from .index import DTYPES, FORMAT, INDEX_FILE, TOKENIZER_FILE, VERSION, read_index
from .packing import chat_splits
from .sampling import DataError, encode_corpus, prepare_data, read_corpus
from .token_lengths import count_bytes, token_byte_lengths, token_char_lengths

__all__ = ["INDEX_FILE", "TOKENIZER_FILE", "FORMAT", "VERSION", "FUSED_MAX_BYTES", "ShardFile", "TokenStream", "Splits",
           "read_index", "open_prepared", "open_splits", "open_tokens", "check_same_tokenizer", "token_byte_lengths",
           "token_char_lengths", "count_bytes",
           "TRAIN_STREAM", "EVAL_TRAIN_STREAM", "EVAL_VAL_STREAM"]

# Token arrays (train + val) up to this size use the fused feed, larger ones the host feed.
# Measured (benchmarks/loader.py, benchmarks/README.md): on the baby shape the two feeds are
# level (host / fused 0.93-0.97 wall, 1.00-1.03 CPU); on sub-millisecond steps the host feed's ~0.1 ms
# per batch costs 1.5x the CPU, so small corpora keep the fused one. The bound is then device
# memory, which the fused feed spends on a replica of the corpus on every device: 64 MiB (32M
# uint16 tokens) is negligible on any accelerator.
FUSED_MAX_BYTES = 64 * 2**20
# Philox counter streams of the host feed (the counter's 4th word), so that the windows of
# training and of the two evaluation splits never share random numbers.
TRAIN_STREAM, EVAL_TRAIN_STREAM, EVAL_VAL_STREAM = 0, 1, 2


# --------------------------------------------------------------------------- token streams
class ShardFile:
    """A shard of token ids on disk (raw little-endian `dtype`, `size` tokens), read with
    positional reads: `shard[a:b]` and `windows(starts, length)` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, dtype: Any, size: int):
        self.path, self.dtype, self.size = Path(path), np.dtype(dtype).newbyteorder("<"), int(size)
        self._fd = os.open(self.path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # random windows: readahead would only waste reads
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)

    def __len__(self) -> int:
        return self.size

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Tokens `[start, start + length)` for each start (within the shard), (n, length)."""
        k = self.dtype.itemsize
        buf = b"".join(os.pread(self._fd, length * k, int(a) * k) for a in starts)
        if len(buf) != len(starts) * length * k:
            raise DataError(f"data_path: shard {str(self.path)!r} is shorter than its {self.size} tokens (was it "
                            "changed while training?); prepare the dataset again")
        return np.frombuffer(buf, self.dtype).reshape(len(starts), length)

    def __getitem__(self, key: slice) -> np.ndarray:
        a, b, _ = key.indices(self.size)
        return self.windows(np.array([a]), max(b - a, 0))[0]


class TokenStream:
    """Tokens `[lo, hi)` of the concatenation of `parts` (1-D token arrays in memory, or
    `ShardFile`s), read-only. `part_bytes[i]` is the UTF-8 bytes of the text
    behind part i (for bits per byte). `view` slices without copying."""

    def __init__(self, parts: Sequence[np.ndarray | ShardFile], part_bytes: Sequence[float] | np.ndarray, lo: int = 0,
                 hi: int | None = None, part_counted: Sequence[float] | np.ndarray | None = None):
        # Plain ndarray views of memory maps: indexing an np.memmap costs ~1 us more per call.
        self.parts = tuple(p if isinstance(p, ShardFile) else np.asarray(p) for p in parts)
        self.sizes = np.array([len(p) for p in self.parts], np.int64)
        self.bounds = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.part_bytes = np.asarray(part_bytes, np.float64)
        self.lo, self.hi = int(lo), int(self.bounds[-1] if hi is None else hi)
        # tokens that bits per byte count, per part (chat data: the trained ones); None: all
        self.part_counted = None if part_counted is None else np.asarray(part_counted, np.float64)
        if not 0 <= self.lo <= self.hi <= self.bounds[-1]:
            raise ValueError(f"TokenStream: [{lo}, {hi}) is outside [0, {self.bounds[-1]})")

    def __len__(self) -> int:
        return self.hi - self.lo

    def view(self, lo: int, hi: int) -> TokenStream:
        """Tokens `[lo, hi)` of this stream (indices relative to it)."""
        return TokenStream(self.parts, self.part_bytes, self.lo + int(lo), self.lo + int(hi), self.part_counted)

    @staticmethod
    def _windows(part: np.ndarray | ShardFile, starts: np.ndarray, length: int) -> np.ndarray:
        if isinstance(part, ShardFile):
            return part.windows(starts, length)
        return part[starts[:, None] + np.arange(length)]

    def _prorated(self, per_part: np.ndarray) -> float:
        overlap = np.clip(np.minimum(self.bounds[1:], self.hi) - np.maximum(self.bounds[:-1], self.lo), 0, None)
        return float(np.sum(per_part * overlap / np.maximum(self.sizes, 1)))

    @property
    def n_bytes(self) -> float:
        """UTF-8 bytes of the text behind these tokens (prorated by tokens in a cut part)."""
        return self._prorated(self.part_bytes)

    @property
    def tokens_per_byte(self) -> float:
        """Tokens per UTF-8 byte of text (nan without bytes): bits/byte = nats/token / ln 2 * this.
        Chat data: trained tokens per byte of trained text (the loss is over those)."""
        counted = len(self) if self.part_counted is None else self._prorated(self.part_counted)
        return counted / self.n_bytes if self.n_bytes > 0 else math.nan

    @property
    def nbytes(self) -> int:
        """Bytes of the token ids themselves (what the fused feed would place on each device)."""
        return (self.parts[0].dtype.itemsize if self.parts else 0) * len(self)

    def array(self) -> np.ndarray:
        """The tokens as one array: a view when they lie in one in-memory part, else read."""
        spans = [(p, a, max(a, self.lo), min(b, self.hi)) for p, a, b in zip(self.parts, self.bounds, self.bounds[1:])]
        pieces = [p[lo - a: hi - a] for p, a, lo, hi in spans if lo < hi]
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, self.parts[0].dtype if self.parts else np.uint16)

    def read(self, starts: Int[np.ndarray, "..."], length: int) -> Int[np.ndarray, "_ length"]:
        """Windows `[start, start + length)` (indices relative to this stream; `starts` of any
        shape, flattened) as int32 of shape (n, length); a window may cross shard boundaries."""
        starts = np.asarray(starts, np.int64).reshape(-1)
        if len(starts) and (starts.min() < 0 or starts.max() + length > len(self)):
            raise IndexError(f"TokenStream.read: a window of {length} tokens from {starts.max()} passes the end "
                             f"({len(self)} tokens)")
        pos = starts + self.lo
        part = np.searchsorted(self.bounds, pos, side="right") - 1
        local = pos - self.bounds[part]
        inside = local + length <= self.sizes[part]
        if len(pos) and inside.all() and (part == part[0]).all():  # the common case: one part
            return self._windows(self.parts[part[0]], local, length).astype(np.int32)
        out = np.empty((len(starts), length), np.int32)
        for p in np.unique(part[inside]):  # one read per part for the windows inside it
            rows = np.flatnonzero(inside & (part == p))
            out[rows] = self._windows(self.parts[p], local[rows], length)
        for r in np.flatnonzero(~inside):  # the rare window across a shard boundary
            got, at, p = 0, int(local[r]), int(part[r])
            while got < length:
                chunk = self.parts[p][at: at + length - got]
                out[r, got: got + len(chunk)] = chunk
                got, at, p = got + len(chunk), 0, p + 1
        return out


@dataclass(frozen=True)
class Splits:
    """The train and validation streams of a run, the tokenizer, and where they came from
    (`prepared`: a prepared directory, read by the host feed whatever its size)."""

    train: TokenStream
    val: TokenStream
    tokenizer: Tokenizer
    prepared: bool = False
    # chat data (issue 23): the loss-mask streams parallel to train / val, and packing's numbers
    train_flags: TokenStream | None = None
    val_flags: TokenStream | None = None
    chat: dict[str, Any] | None = None
    packing: dict[str, Any] | None = None  # chat data: {"train", "val"}: packing.Packing, the feed's bins

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def describe(self, feed: str) -> dict[str, Any]:
        """The `data` entry of model_summary.json (chat data: + "chat", its packing numbers)."""
        out = {"source": "prepared" if self.prepared else "text", "feed": feed,
                "train_tokens": len(self.train), "val_tokens": len(self.val),
                "train_bytes": round(self.train.n_bytes), "val_bytes": round(self.val.n_bytes),
                "train_bytes_per_token": _ratio(self.train.n_bytes, len(self.train)),
                "val_bytes_per_token": _ratio(self.val.n_bytes, len(self.val))}
        return out if self.chat is None else out | {"chat": self.chat}


def _ratio(a: float, b: int) -> float | None:
    return round(a / b, 4) if b else None  # JSON has no NaN


# --------------------------------------------------------------------------- prepared directories
def open_prepared(path: str | os.PathLike, field: str = "data_path") -> tuple[TokenStream, Tokenizer]:
    """The whole token stream of a prepared dataset (shard files opened read-only) and its tokenizer.
    Chat data (version 2): bits per byte count its trained tokens only (`TokenStream.part_counted`)."""
    path = Path(path)
    index = read_index(path, field)
    dtype = DTYPES[index["dtype"]]
    shards = [s for s in index["shards"] if int(s["tokens"]) > 0]
    parts = [ShardFile(path / s["file"], dtype, int(s["tokens"])) for s in shards]
    counted = [float(s["trained_tokens"]) for s in shards] if "chat" in index else None
    stream = TokenStream(parts, [float(s["bytes"]) for s in shards], part_counted=counted)
    return stream, tk.load_tokenizer(path / TOKENIZER_FILE)


def open_flags(path: str | os.PathLike, field: str = "data_path") -> tuple[TokenStream, dict[str, Any]] | None:
    """The loss-mask stream (uint8 flags, parallel to the tokens) and the "chat" entry of a chat
    dataset (index version 2), or None for a text dataset."""
    path = Path(path)
    index = read_index(path, field)
    if "chat" not in index:
        return None
    shards = [s for s in index["shards"] if int(s["tokens"]) > 0]
    parts = [ShardFile(path / s["flags_file"], np.uint8, int(s["tokens"])) for s in shards]
    return TokenStream(parts, [0.0] * len(parts)), index["chat"]


def check_same_tokenizer(path: Path, prepared: Tokenizer, tokenizer: Tokenizer, source: str, field: str) -> None:
    # Compared in the library's canonical serialisation: a run's tokenizer.json (written by
    # save_tokenizer) and a prepared one copied from elsewhere may differ in whitespace only.
    if tk.digest(prepared) != tk.digest(tokenizer):
        raise DataError(f"{field}: the prepared dataset {str(path)!r} was tokenized with {str(path / TOKENIZER_FILE)!r}"
                        f", not with {source}; prepare it again with --tokenizer_path {source}")


def _text_stream(ids: np.ndarray, lengths: np.ndarray) -> TokenStream:
    return TokenStream([ids], [count_bytes(ids, lengths)])


# --------------------------------------------------------------------------- the splits of a run
def _check_long_enough(splits: Splits, max_context: int, val_field: str) -> Splits:
    for name, part, field in (("training", splits.train, "data_path"), ("validation", splits.val, val_field)):
        if len(part) < max_context + 1:
            raise DataError(f"{field}: the {name} split has {len(part)} tokens, fewer than max_context + 1 = "
                            f"{max_context + 1}; use more data or a smaller max_context")
    return splits


def open_splits(data_path: str | os.PathLike, config: Config, tokenizer: Tokenizer | None = None,
                tokenizer_source: str | None = None, cache_dir: str | os.PathLike | None = None,
                chat_template: str | None = None) -> Splits:
    """The train/val streams of `data_path` (a prepared directory or a text file; any other
    source `prepare` takes is prepared into `cache_dir` first: data/cached.py) for `config`
    (max_context, val_fraction, max_train_tokens, val_path, and for text the tokenizer fields).

    `tokenizer`: the run's tokenizer when it is fixed (resume, fine-tune, tokenizer_path),
    named `tokenizer_source` in errors; a prepared dataset made with another one is refused
    (DataError). None: the prepared dataset's own tokenizer, or one trained on the text.
    The training split is capped at `max_train_tokens` (its first tokens).

    Chat data (issue 23): a .jsonl of conversations or prompt/completion pairs is prepared into
    the cache with `chat_template` (chat_prepare.py; it needs the fixed `tokenizer`), and a
    chat dataset's splits carry their loss-mask streams, cut at example boundaries and packed
    into windows (packing.py; its numbers in `Splits.chat`).
    """
    path = Path(data_path)
    val_is_chat = config.val_path is not None and _is_chat_source(Path(config.val_path))
    if val_is_chat and not _is_chat_source(path, "data_path"):
        raise DataError("val_path: chat data (conversations / prompt-completion) validates chat training data "
                        "only; pass plain-text validation data, or train on chat data")
    if is_chat_jsonl(path):
        if tokenizer is None:
            raise DataError("data_path: chat data trains a model with its tokenizer: fine-tune a run (init_from) "
                            "or set tokenizer_path to the model's tokenizer.json")
        path = _prepared_chat(path, tokenizer, chat_template, config, cache_dir, "data_path")
    elif needs_prepare(path):
        path = prepared_source(path, cache_dir if cache_dir is not None else default_cache_dir(), config, tokenizer)
    prepared = path.is_dir()
    if prepared:
        stream, own = open_prepared(path)
        if tokenizer is not None:
            check_same_tokenizer(path, own, tokenizer, tokenizer_source or "the run's tokenizer", "data_path")
        tokenizer = tokenizer or own
        chat = open_flags(path)
        if chat is not None:
            val = None if config.val_path is None else _open_chat_val(
                Path(config.val_path), chat[1], tokenizer, tokenizer_source, chat_template, config, cache_dir)
            return _chat_splits(stream, *chat, tokenizer, config, val)
    elif config.val_path is None:  # today's path, unchanged: a cached token array beside the text
        ds = prepare_data(path, tokenizer_type=config.tokenizer_type, max_context=config.max_context,
                          val_fraction=config.val_fraction, max_train_tokens=config.max_train_tokens,
                          bpe_vocab_size=config.bpe_vocab_size, tokenizer=tokenizer, cache_dir=cache_dir,
                          unknown_chars=config.unknown_chars)
        lengths = token_byte_lengths(ds.tokenizer)
        return Splits(_text_stream(ds.train, lengths), _text_stream(ds.val, lengths), ds.tokenizer)
    else:
        if tokenizer is None:
            tokenizer = tk.build_tokenizer(config.tokenizer_type, read_corpus(path), config.bpe_vocab_size)
        ids = encode_corpus(path, tokenizer, cache_dir, config.unknown_chars)
        stream = TokenStream([ids], [count_bytes(ids, token_byte_lengths(tokenizer))])
    if config.val_path is None:
        n_val = int(len(stream) * config.val_fraction)
        train, val = stream.view(0, len(stream) - n_val), stream.view(len(stream) - n_val, len(stream))
    else:
        train, val = stream, _open_val(Path(config.val_path), tokenizer, tokenizer_source, cache_dir,
                                     config.unknown_chars)
    train = train.view(0, min(len(train), config.max_train_tokens))
    return _check_long_enough(Splits(train, val, tokenizer, prepared), config.max_context,
                              "data_path" if config.val_path is None else "val_path")


def open_tokens(data_path: str | os.PathLike, config: Config, tokenizer: Tokenizer, tokenizer_source: str,
                cache_dir: str | os.PathLike | None = None) -> TokenStream:
    """The whole token stream of a source that is not a text file of at most RAW_TEXT_BYTES (a
    prepared directory, or any source `prepare` takes, prepared into `cache_dir` with
    `tokenizer` as training prepares it: data/cached.py), read with the fixed `tokenizer`
    (named `tokenizer_source` in errors): a prepared dataset made with another one is refused
    (DataError naming data_path). `config` gives dataset_text_field and unknown_chars."""
    path = Path(data_path).expanduser()
    if needs_prepare(path):
        path = prepared_source(path, cache_dir if cache_dir is not None else default_cache_dir(), config, tokenizer)
    if not path.is_dir():
        raise DataError(f"data_path: {str(data_path)!r} does not exist; pass a text file, a prepared dataset "
                        "directory or another source `prepare` takes")
    stream, own = open_prepared(path)
    check_same_tokenizer(path, own, tokenizer, tokenizer_source, "data_path")
    return stream


def _chat_splits(stream: TokenStream, flags: TokenStream, chat: dict[str, Any], tokenizer: Tokenizer,
                 config: Config, val: tuple[TokenStream, TokenStream] | None = None) -> Splits:
    """A chat dataset's splits, cut at example starts and packed (`packing.chat_splits`); `val`
    (tokens, flags): a separate validation set (`val_path`)."""
    train, val, train_flags, val_flags, packs, info = chat_splits(stream, flags, chat, config, val)
    return Splits(train, val, tokenizer, True, train_flags, val_flags, info, packs)


def _prepared_chat(path: Path, tokenizer: Tokenizer, template: str | None, config: Config, cache_dir: Any,
                   field: str) -> Path:
    """The prepared cache directory of the chat JSONL `path` (rendered with `template` and
    config.train_on; prepared on first use). DataError naming `field` for a bad row."""
    root = Path(cache_dir if cache_dir is not None else default_cache_dir())
    return prepare_chat(path, chat_cache_dir(path, root, tokenizer, template, config.train_on), tokenizer, template,
                        config.train_on, field)


def _is_chat_source(path: Path, field: str = "val_path") -> bool:
    """A chat JSONL, or a prepared directory with a loss-mask stream (index version 2 "chat")."""
    if is_chat_jsonl(path):
        return True
    return (path / INDEX_FILE).is_file() and open_flags(path, field) is not None


def _open_chat_val(path: Path, chat: dict[str, Any], tokenizer: Tokenizer, source: str | None,
                   template: str | None, config: Config, cache_dir: Any) -> tuple[TokenStream, TokenStream]:
    """(tokens, flags) of the separate validation set of chat training data: a chat JSONL
    (rendered and masked as the training data: the run's template and train_on) or a prepared
    chat directory made with the same tokenizer, template and train_on as the training data."""
    if is_chat_jsonl(path):
        path = _prepared_chat(path, tokenizer, template, config, cache_dir, "val_path")
    elif not (path / INDEX_FILE).is_file():
        raise DataError(f"val_path: {str(path)!r} is not chat data; chat training data validates on a chat .jsonl "
                        "(conversations or prompt/completion rows) or a prepared chat directory")
    stream, own = open_prepared(path, "val_path")
    check_same_tokenizer(path, own, tokenizer, source or "the training data's tokenizer", "val_path")
    found = open_flags(path, "val_path")
    if found is None:
        raise DataError(f"val_path: {str(path)!r} is a plain-text dataset; chat training data validates on a chat "
                        ".jsonl or a prepared chat directory")
    flags, val_chat = found
    for key, what in (("train_on", "train_on"), ("template_sha256", "chat template")):
        if val_chat.get(key) != chat.get(key):
            raise DataError(f"val_path: {str(path)!r} was prepared with another {what} than the training data "
                            f"({val_chat.get(key)!r}, not {chat.get(key)!r}); prepare both the same way")
    return stream, flags


def _open_val(path: Path, tokenizer: Tokenizer, source: str | None, cache_dir: Any,
              unknown_chars: str = "error") -> TokenStream:
    """The separate validation stream: a prepared directory (same tokenizer) or a text file."""
    if path.is_dir():
        stream, own = open_prepared(path, "val_path")
        check_same_tokenizer(path, own, tokenizer, source or "the training data's tokenizer", "val_path")
        return stream
    if not path.is_file():
        raise DataError(f"val_path: {str(path)!r} does not exist; pass a text file or a prepared dataset directory")
    try:
        ids = encode_corpus(path, tokenizer, cache_dir, unknown_chars)
    except DataError as e:
        raise DataError(str(e).replace("data_path:", "val_path:", 1)) from None
    return _text_stream(ids, token_byte_lengths(tokenizer))
