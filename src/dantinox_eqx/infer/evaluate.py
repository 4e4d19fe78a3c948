"""How well a model predicts a text: loss, perplexity, bits per token, character and byte.

Two ways to choose the scored windows (each `seq_len + 1` tokens: inputs and shifted targets):
- all (default): consecutive windows with stride `seq_len` cover the text, so every token but
  the first is predicted exactly once (a last window aligned to the end scores only the
  tokens not yet scored). Deterministic; the cost grows with the text.
- random (`n_batches`): `n_batches * batch_size` windows at uniform random starts drawn with
  `seed` (`data.sample_batch`): a fixed-cost estimate, the same for the same seed.

Every window gives each target the full context before it in that window (up to seq_len - 1
tokens), as in training. Losses are float32 per token and summed in float64 on the host.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int
from tokenizers import Tokenizer

from ..config import Config
from ..data import tokenizer as tk
from ..data.cached import needs_prepare
from ..data.sampling import DataError, read_corpus, sample_batch
from ..data.tokenizer import drop_unknown_chars, encode
from ..data.tokens import count_bytes, open_tokens, token_byte_lengths, token_char_lengths
from ..model import Transformer

__all__ = ["EvalResult", "evaluate", "evaluate_tokens", "evaluate_source", "evaluate_ids", "covering_windows"]


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy, nats per predicted token
    perplexity: float  # exp(loss)
    bits_per_token: float
    bits_per_char: float  # total bits / characters of the predicted text
    n_tokens: int  # predicted (scored) tokens
    n_chars: float  # characters they stand for (estimated from the text's ratio in random mode)
    n_windows: int
    seq_len: int
    mode: str  # "all" or "random"
    # bits per UTF-8 byte (issue 14): comparable across tokenizers, and with other models' bpb
    bits_per_byte: float  # total bits / UTF-8 bytes of the predicted text
    n_bytes: float  # the bytes they stand for (estimated like n_chars in random mode)

    def to_dict(self) -> dict:
        return asdict(self)


def covering_windows(n: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Window starts and a (n_windows, seq_len) mask of the targets to score, such that every
    token index 1..n-1 is scored exactly once (n >= seq_len + 1)."""
    starts = list(range(0, n - seq_len, seq_len))
    mask = np.ones((len(starts), seq_len), bool)
    covered = starts[-1] + seq_len  # last token index scored so far
    if covered < n - 1:
        last = n - seq_len - 1
        starts.append(last)
        mask = np.concatenate([mask, (last + 1 + np.arange(seq_len) > covered)[None]])
    return np.asarray(starts), mask


@eqx.filter_jit
def _nll_sum(model: Transformer, windows: Int[Array, "B W"], mask: Bool[Array, "B T"]) -> Float[Array, ""]:
    features, _ = model.features(windows[:, :-1])  # chunked loss: no (B, T, V) logits when V is large
    return model.token_loss(features, windows[:, 1:], mask.astype(jnp.float32))[0]


def evaluate_ids(model: Transformer, ids: np.ndarray, *, batch_size: int = 8, seq_len: int | None = None,
                 n_batches: int | None = None, seed: int = 0, skip: int | None = None) -> tuple[float, int, int, int]:
    """(summed nats, scored tokens, windows, seq_len) of `model` on token ids `ids`.

    `n_batches=None` scores every token once (see the module docstring); otherwise
    `n_batches` batches of random windows drawn with `seed`. Targets equal to `skip` (a
    prepared dataset's end-of-text id) are context only, never scored.
    """
    ids = np.asarray(ids)
    if len(ids) < 2:
        raise DataError(f"data_path: the text has {len(ids)} token(s); evaluation needs at least 2")
    seq_len = min(seq_len or model.max_context, model.max_context, len(ids) - 1)
    if n_batches is None:
        starts, mask = covering_windows(len(ids), seq_len)
        pad = -len(starts) % batch_size  # whole batches: one compiled shape
        starts = np.concatenate([starts, np.zeros(pad, int)])
        mask = np.concatenate([mask, np.zeros((pad, seq_len), bool)])
        windows = ids[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
        batches = windows.reshape(-1, batch_size, seq_len + 1)
        masks = mask.reshape(-1, batch_size, seq_len)
        n_windows = len(starts) - pad
    else:
        tokens = jnp.asarray(ids, jnp.int32)
        batches = np.asarray(sample_batch(tokens, jax.random.key(seed), batch_size, seq_len, n_batches))
        masks = np.ones((n_batches, batch_size, seq_len), bool)
        n_windows = n_batches * batch_size
    if skip is not None:
        masks = masks & (np.asarray(batches)[..., 1:] != skip)
    total = 0.0
    for w, m in zip(batches, masks):
        total += float(_nll_sum(model, jnp.asarray(w), jnp.asarray(m)))
    return total, int(masks.sum()), n_windows, seq_len


def evaluate(model: Transformer, tokenizer: Tokenizer, text: str, *, batch_size: int = 8,
             seq_len: int | None = None, n_batches: int | None = None, seed: int = 0,
             unknown_chars: str = "error") -> EvalResult:
    """Loss, perplexity and bits per token / character of `model` on `text` (see the module
    docstring for the windows). Raises TokenizerError for text a char vocabulary cannot encode,
    unless `unknown_chars="drop"`: those characters are then left out (and not counted)."""
    text = drop_unknown_chars(tokenizer, text, unknown_chars)
    ids = np.asarray(encode(tokenizer, text))
    nats, n_tokens, n_windows, seq_len = evaluate_ids(model, ids, batch_size=batch_size, seq_len=seq_len,
                                                      n_batches=n_batches, seed=seed)
    total_bytes = len(text.encode("utf-8"))
    if n_batches is None:  # exactly the characters (bytes) after the first token
        first = tokenizer.decode([int(ids[0])])
        n_chars = float(len(text) - len(first))
        n_bytes = float(total_bytes - len(first.encode("utf-8")))
    else:
        n_chars = n_tokens * len(text) / len(ids)
        n_bytes = n_tokens * total_bytes / len(ids)
    return _result(nats, n_tokens, n_windows, seq_len, n_batches, n_chars, n_bytes)


def evaluate_tokens(model: Transformer, tokenizer: Tokenizer, ids: np.ndarray, *, batch_size: int = 8,
                    seq_len: int | None = None, n_batches: int | None = None, seed: int = 0) -> EvalResult:
    """`evaluate` on token ids (a prepared dataset's: documents joined by the tokenizer's
    end-of-text token). The separators are the documents' boundaries, not text: they stay in
    the windows as context (as in training) but are never scored, and a last one (the end of
    the last document) is left out, so one document scores exactly as its text does. Characters
    and bytes are counted from the ids (tokens.token_char_lengths / token_byte_lengths: the
    text's own counts, exactly)."""
    ids, eot = np.asarray(ids), tk.eot_id(tokenizer)
    if eot is not None and len(ids) and ids[-1] == eot:
        ids = ids[:-1]
    nats, n_tokens, n_windows, seq_len = evaluate_ids(model, ids, batch_size=batch_size, seq_len=seq_len,
                                                      n_batches=n_batches, seed=seed, skip=eot)
    char_len, byte_len = token_char_lengths(tokenizer), token_byte_lengths(tokenizer)
    total_chars, total_bytes = count_bytes(ids, char_len), count_bytes(ids, byte_len)
    if n_batches is None:  # the characters (bytes) after the first token, as evaluate counts them
        n_chars, n_bytes = total_chars - char_len[ids[0]], total_bytes - byte_len[ids[0]]
    else:
        n_chars, n_bytes = n_tokens * total_chars / len(ids), n_tokens * total_bytes / len(ids)
    return _result(nats, n_tokens, n_windows, seq_len, n_batches, float(n_chars), float(n_bytes))


def evaluate_source(model: Transformer, tokenizer: Tokenizer, data_path: str | os.PathLike, config: Config, *,
                    tokenizer_source: str, batch_size: int = 8, seq_len: int | None = None,
                    n_batches: int | None = None, seed: int = 0, unknown_chars: str = "error") -> EvalResult:
    """`evaluate` on `data_path`, any source `train` takes: a text file (of at most
    RAW_TEXT_BYTES: its text), a prepared dataset directory made with `tokenizer`, or a folder,
    glob, .jsonl, .parquet or larger text file (prepared into the cache with `tokenizer`, as
    training prepares it: data/cached.py). `config` (the run's) gives dataset_text_field;
    `tokenizer_source` names the tokenizer in errors. DataError naming data_path for a source
    training would refuse or a prepared dataset tokenized otherwise."""
    path = Path(data_path).expanduser()
    if path.is_file() and not needs_prepare(path):
        return evaluate(model, tokenizer, read_corpus(path), batch_size=batch_size, seq_len=seq_len,
                        n_batches=n_batches, seed=seed, unknown_chars=unknown_chars)
    stream = open_tokens(path, config.replace(unknown_chars=unknown_chars), tokenizer, tokenizer_source)
    return evaluate_tokens(model, tokenizer, stream.array(), batch_size=batch_size, seq_len=seq_len,
                           n_batches=n_batches, seed=seed)


def _result(nats: float, n_tokens: int, n_windows: int, seq_len: int, n_batches: int | None, n_chars: float,
            n_bytes: float) -> EvalResult:
    loss = nats / n_tokens
    bits = nats / math.log(2)
    return EvalResult(loss=loss, perplexity=math.exp(loss), bits_per_token=bits / n_tokens,
                      bits_per_char=bits / max(n_chars, 1.0), n_tokens=n_tokens, n_chars=n_chars,
                      n_windows=n_windows, seq_len=seq_len, mode="all" if n_batches is None else "random",
                      bits_per_byte=bits / max(n_bytes, 1.0), n_bytes=n_bytes)
