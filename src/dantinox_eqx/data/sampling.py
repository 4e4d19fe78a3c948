"""Corpus -> token ids (cached, memory-mapped) -> train/val split -> pure batch sampling.

The batch of step `s` is `sample_batch(tokens, jax.random.fold_in(data_key, s), ...)`: a pure
function of the key and the step, so any step's batch can be rebuilt exactly (that is what
makes resume exact: the "data position" is just the step number).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, Integer, PRNGKeyArray
from tokenizers import Tokenizer

from ..files import atomic_path, sha256_file
from . import tokenizer as tk

__all__ = ["DataError", "Dataset", "read_corpus", "encode_corpus", "split", "sample_batch",
           "prepare_data"]


class DataError(ValueError):
    """The corpus is missing, empty, undecodable, or too short for the context length."""


def read_corpus(path: str | os.PathLike) -> str:
    """The corpus as text (UTF-8). Raises DataError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data_path: {str(path)!r} does not exist or is not a file")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"data_path: {str(path)!r} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"data_path: {str(path)!r} is not UTF-8 text (undecodable byte at offset {e.start}); "
            "convert it to UTF-8"
        ) from None


def _cache_name(corpus_path: Path, tok: Tokenizer, unknown_chars: str = "error") -> str:
    h = hashlib.sha256()
    sha256_file(corpus_path, into=h)
    h.update(tok.to_str().encode())
    if unknown_chars != "error":  # "drop" may give other ids; "error" keeps the names of old caches
        h.update(unknown_chars.encode())
    return f"{corpus_path.name}.{h.hexdigest()[:16]}.tokens.npy"


def _writable(directory: Path) -> bool:
    """Writable by access() AND by its mode bits: root passes access() even on a folder laid
    out read-only (shared corpora), and we must not drop cache files there."""
    if not directory.is_dir() or not os.access(directory, os.W_OK):
        return False
    return bool(directory.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def encode_corpus(corpus_path: str | os.PathLike, tok: Tokenizer,
                  cache_dir: str | os.PathLike | None = None, unknown_chars: str = "error") -> np.ndarray:
    """Token ids of the corpus as a read-only memory-mapped array (uint16 or uint32).

    The ids are cached in `<corpus>.<hash>.tokens.npy` in `cache_dir` when given, else beside
    the corpus when that folder is writable (never in a read-only one); the hash covers the
    corpus bytes and the tokenizer, so a changed corpus or tokenizer is re-encoded and an unchanged one is reused.
    """
    corpus_path = Path(corpus_path)
    text = read_corpus(corpus_path)
    name = _cache_name(corpus_path, tok, unknown_chars)
    # An explicit cache_dir (the run directory) wins; beside the corpus is the shared default.
    candidates = ([Path(cache_dir)] if cache_dir is not None else []) + [corpus_path.parent]
    for d in candidates:
        if (d / name).is_file():
            return np.load(d / name, mmap_mode="r")
    try:
        ids = tk.encode_text(tok, text, unknown_chars)  # the ids of tk.encode, in bounded memory
    except tk.TokenizerError as e:
        raise DataError(f"data_path: {e}") from None
    del text
    dtype = np.uint16 if tok.get_vocab_size() <= np.iinfo(np.uint16).max else np.uint32
    arr = ids.astype(dtype)
    del ids
    target = next((d for d in candidates if _writable(d)), None)
    if target is None:  # nowhere to cache: keep it in memory
        return arr
    with atomic_path(target / name) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)
    return np.load(target / name, mmap_mode="r")


def split(ids: np.ndarray, val_fraction: float, max_train_tokens: int | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """The first (1 - val_fraction) of the ids train, the tail validates (nanoGPT's split)."""
    n_val = int(len(ids) * val_fraction)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    if max_train_tokens is not None:
        train = train[:max_train_tokens]
    return train, val


def sample_batch(tokens: Integer[Array, " n"], key: PRNGKeyArray, batch_size: int, seq_len: int,
                 accum: int = 1) -> Int[Array, "accum batch window"]:
    """`accum x batch_size` random windows of `seq_len + 1` tokens (inputs + shifted targets).

    Pure in `key`: the same key gives the same batch. Window starts are uniform over every
    position that leaves a full window. Returns int32 of shape (accum, batch_size, seq_len + 1).
    """
    starts = jax.random.randint(key, (accum, batch_size), 0, tokens.shape[0] - seq_len)
    return tokens[starts[..., None] + jnp.arange(seq_len + 1)].astype(jnp.int32)


@dataclass(frozen=True)
class Dataset:
    """Train and validation token ids (host arrays) and the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def prepare_data(data_path: str | os.PathLike, *, tokenizer_type: str, max_context: int,
                 val_fraction: float = 0.1, max_train_tokens: int | None = None,
                 bpe_vocab_size: int = 2048, tokenizer: Tokenizer | None = None,
                 cache_dir: str | os.PathLike | None = None, unknown_chars: str = "error") -> Dataset:
    """Read, tokenize (training a tokenizer unless one is given), encode and split a corpus.

    Raises DataError when either split is shorter than `max_context + 1` tokens.
    """
    if tokenizer is None:
        tokenizer = tk.build_tokenizer(tokenizer_type, read_corpus(data_path), bpe_vocab_size)
    ids = encode_corpus(data_path, tokenizer, cache_dir, unknown_chars)
    train, val = split(ids, val_fraction, max_train_tokens)
    for name, part in (("training", train), ("validation", val)):
        if len(part) < max_context + 1:
            raise DataError(
                f"data_path: the {name} split has {len(part)} tokens, fewer than max_context + 1 = "
                f"{max_context + 1}; use a longer corpus or a smaller max_context"
            )
    return Dataset(train=train, val=val, tokenizer=tokenizer)
