"""How well a model predicts a text: loss, perplexity, bits per token, character and byte.

Two ways to choose the scored windows (each `seq_len + 1` tokens: inputs and shifted targets):
- all (default): consecutive windows with stride `seq_len` cover the text, so every token but
  the first is predicted exactly once (a last window aligned to the end scores only the
  tokens not yet scored). Deterministic; the cost grows with the text.
- random (`n_batches`): `n_batches * batch_size` windows at uniform random starts drawn with
  `seed` (`data.sample_batch`): a fixed-cost estimate, the same for the same seed.

Every window gives each target the full context before it in that window (up to seq_len - 1
tokens), as in training. Losses are float32 per token and summed in float64 on the host.

Masked data, as training masks it (issue 23):
- chat data (a conversations / prompt-completion JSONL, rendered with the run's chat template
  and `train_on`, or a prepared chat directory): the examples are packed into windows exactly
  as training packs a split (`packing.pack`: whole examples, attention and positions restarting
  at each one, an example longer than the window cut to it) and only the trained (assistant)
  targets are scored. "all" scores every packed window once, "random" draws
  `n_batches * batch_size` windows with `seed`. Bits per byte use the dataset's trained tokens
  per trained byte (index.json), as the training log's bits per byte do.
- a run trained with `document_mask: true`: each window is cut into documents at the
  end-of-text token (`step.document_flags`): attention restarts after it, it is scored (it
  ends its document) and the first token of the next document is not (nothing predicts it).
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
from ..data.chat_prepare import chat_cache_dir, is_chat_jsonl, prepare_chat
from ..data.packing import pack, read_bins
from ..data.sampling import DataError, read_corpus, sample_batch
from ..data.tokenizer import drop_unknown_chars, encode
from ..data.tokens import (
    INDEX_FILE,
    TokenStream,
    check_same_tokenizer,
    count_bytes,
    open_flags,
    open_prepared,
    open_tokens,
    token_byte_lengths,
    token_char_lengths,
)
from ..files import cache_dir as default_cache_dir
from ..model import Transformer
from ..train.step import STARTS, TRAINED, document_flags, masked_sums

__all__ = ["EvalResult", "evaluate", "evaluate_tokens", "evaluate_source", "evaluate_ids", "evaluate_packed",
           "covering_windows"]


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
    # which targets count (module docstring): "text" all, "documents" document-masked,
    # "chat" the trained (assistant) tokens of packed examples
    scored: str = "text"

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


@eqx.filter_jit
def _masked_nll(model: Transformer, windows: Int[Array, "B W"], flags: Int[Array, "B W"]
                ) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(summed nats, scored targets) of masked windows: training's `masked_sums`, without dropout."""
    return masked_sums(model, (windows, flags))[:2]


@eqx.filter_jit
def _document_flags(windows: Int[Array, "B W"], mask: Bool[Array, "B T"], doc_sep: int) -> Int[Array, "B W"]:
    """Training's `document_flags`, with the targets outside `mask` (scored elsewhere) not trained."""
    flags = document_flags(windows, doc_sep)
    keep = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1)
    return jnp.where(keep, flags, flags & ~TRAINED)


def evaluate_ids(model: Transformer, ids: np.ndarray, *, batch_size: int = 8, seq_len: int | None = None,
                 n_batches: int | None = None, seed: int = 0, skip: int | None = None,
                 doc_sep: int | None = None) -> tuple[float, int, int, int]:
    """(summed nats, scored tokens, windows, seq_len) of `model` on token ids `ids`.

    `n_batches=None` scores every token once (see the module docstring); otherwise
    `n_batches` batches of random windows drawn with `seed`. Targets equal to `skip` (a
    prepared dataset's end-of-text id) are context only, never scored. `doc_sep` (a run
    trained with document_mask): windows are cut into documents at that id, as training cuts
    them (module docstring); `skip` is then ignored (the separator ends, and scores with, its
    document).
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
    if doc_sep is not None:
        total, count = 0.0, 0
        for w, m in zip(batches, masks):
            w = jnp.asarray(w)
            nats, n = _masked_nll(model, w, _document_flags(w, jnp.asarray(m), doc_sep))
            total, count = total + float(nats), count + int(n)
        return total, count, n_windows, seq_len
    if skip is not None:
        masks = masks & (np.asarray(batches)[..., 1:] != skip)
    total = 0.0
    for w, m in zip(batches, masks):
        total += float(_nll_sum(model, jnp.asarray(w), jnp.asarray(m)))
    return total, int(masks.sum()), n_windows, seq_len


def evaluate(model: Transformer, tokenizer: Tokenizer, text: str, *, batch_size: int = 8,
             seq_len: int | None = None, n_batches: int | None = None, seed: int = 0,
             unknown_chars: str = "error", doc_sep: int | None = None) -> EvalResult:
    """Loss, perplexity and bits per token / character of `model` on `text` (see the module
    docstring for the windows). Raises TokenizerError for text a char vocabulary cannot encode,
    unless `unknown_chars="drop"`: those characters are then left out (and not counted).
    `doc_sep`: document masks (`evaluate_ids`)."""
    text = drop_unknown_chars(tokenizer, text, unknown_chars)
    ids = np.asarray(encode(tokenizer, text))
    nats, n_tokens, n_windows, seq_len = evaluate_ids(model, ids, batch_size=batch_size, seq_len=seq_len,
                                                      n_batches=n_batches, seed=seed, doc_sep=doc_sep)
    total_bytes = len(text.encode("utf-8"))
    if n_batches is None:  # exactly the characters (bytes) after the first token
        first = tokenizer.decode([int(ids[0])])
        n_chars = float(len(text) - len(first))
        n_bytes = float(total_bytes - len(first.encode("utf-8")))
    else:
        n_chars = n_tokens * len(text) / len(ids)
        n_bytes = n_tokens * total_bytes / len(ids)
    return _result(nats, n_tokens, n_windows, seq_len, n_batches, n_chars, n_bytes,
                   "text" if doc_sep is None else "documents")


def evaluate_tokens(model: Transformer, tokenizer: Tokenizer, ids: np.ndarray, *, batch_size: int = 8,
                    seq_len: int | None = None, n_batches: int | None = None, seed: int = 0,
                    document_mask: bool = False) -> EvalResult:
    """`evaluate` on token ids (a prepared dataset's: documents joined by the tokenizer's
    end-of-text token). The separators are the documents' boundaries, not text: they stay in
    the windows as context (as in training) but are never scored, and a last one (the end of
    the last document) is left out, so one document scores exactly as its text does. Characters
    and bytes are counted from the ids (tokens.token_char_lengths / token_byte_lengths: the
    text's own counts, exactly). `document_mask` (a run trained with it): the windows are cut
    into documents at the separators and the separators scored, as training does (module
    docstring)."""
    ids, eot = np.asarray(ids), tk.eot_id(tokenizer)
    if eot is not None and len(ids) and ids[-1] == eot:
        ids = ids[:-1]
    doc_sep = eot if document_mask else None
    nats, n_tokens, n_windows, seq_len = evaluate_ids(model, ids, batch_size=batch_size, seq_len=seq_len,
                                                      n_batches=n_batches, seed=seed, skip=eot, doc_sep=doc_sep)
    char_len, byte_len = token_char_lengths(tokenizer), token_byte_lengths(tokenizer)
    total_chars, total_bytes = count_bytes(ids, char_len), count_bytes(ids, byte_len)
    if n_batches is None:  # the characters (bytes) after the first token, as evaluate counts them
        n_chars, n_bytes = total_chars - char_len[ids[0]], total_bytes - byte_len[ids[0]]
    else:
        n_chars, n_bytes = n_tokens * total_chars / len(ids), n_tokens * total_bytes / len(ids)
    return _result(nats, n_tokens, n_windows, seq_len, n_batches, float(n_chars), float(n_bytes),
                   "text" if doc_sep is None else "documents")


def evaluate_packed(model: Transformer, tokenizer: Tokenizer, tokens: TokenStream, flags: TokenStream, *,
                    batch_size: int = 8, seq_len: int | None = None, n_batches: int | None = None,
                    seed: int = 0) -> EvalResult:
    """The trained-token loss of `model` on chat data: the token stream of a prepared chat
    dataset and its loss-mask `flags` (parallel streams), packed into windows of seq_len + 1
    (default the model's max_context + 1) as training packs them (module docstring). The
    characters are those of the scored tokens (`token_char_lengths`: special tokens count 0);
    the bytes are the scored tokens / the dataset's trained tokens per trained byte
    (`tokens.tokens_per_byte`, training's bits-per-byte ratio)."""
    seq_len = min(seq_len or model.max_context, model.max_context)
    packing = pack(flags, seq_len + 1)
    if len(packing) == 0:
        raise DataError("data_path: the chat data has no example with a trained token inside a window of "
                        f"{seq_len + 1} tokens; use a larger --max_context")
    if n_batches is None:  # every packed window once; the last batch padded with empty rows
        bins = np.arange(len(packing) + (-len(packing) % batch_size)).reshape(-1, batch_size)
        n_windows = len(packing)
    else:
        bins = np.random.default_rng(seed).integers(len(packing), size=(n_batches, batch_size))
        n_windows = n_batches * batch_size
    char_len = token_char_lengths(tokenizer)
    nats, count, chars = 0.0, 0, 0.0
    for row in bins:
        ids, marks = read_bins(tokens, flags, packing, np.minimum(row, len(packing) - 1))
        marks[row >= len(packing)] = STARTS  # padding rows: nothing scored
        got, n = _masked_nll(model, jnp.asarray(ids), jnp.asarray(marks))
        nats, count = nats + float(got), count + int(n)
        scored = (marks[:, 1:] & TRAINED) > 0
        chars += float(char_len[ids[:, 1:][scored]].sum())
    if count == 0:
        raise DataError("data_path: no trained token was scored; evaluate more batches or all windows")
    n_bytes = count / tokens.tokens_per_byte
    return _result(nats, count, n_windows, seq_len, n_batches, chars, n_bytes, "chat")


def evaluate_source(model: Transformer, tokenizer: Tokenizer, data_path: str | os.PathLike, config: Config, *,
                    tokenizer_source: str, batch_size: int = 8, seq_len: int | None = None,
                    n_batches: int | None = None, seed: int = 0, unknown_chars: str = "error",
                    chat_template: str | None = None, cache_dir: str | os.PathLike | None = None) -> EvalResult:
    """`evaluate` on `data_path`, any source `train` takes: a text file (of at most
    RAW_TEXT_BYTES: its text), a prepared dataset directory made with `tokenizer`, or a folder,
    glob, .jsonl, .parquet or larger text file (prepared into the cache with `tokenizer`, as
    training prepares it: data/cached.py). `config` (the run's) gives dataset_text_field,
    train_on and document_mask; `tokenizer_source` names the tokenizer in errors. Chat data (a
    chat JSONL, rendered with `chat_template`, the run's, and prepared into `cache_dir` as
    training prepares it; or a prepared chat directory): `evaluate_packed`. DataError naming
    data_path for a source training would refuse or a prepared dataset tokenized otherwise."""
    path = Path(data_path).expanduser()
    if is_chat_jsonl(path):
        root = Path(cache_dir if cache_dir is not None else default_cache_dir())
        path = prepare_chat(path, chat_cache_dir(path, root, tokenizer, chat_template, config.train_on), tokenizer,
                            chat_template, config.train_on)
    chat = open_flags(path) if (path / INDEX_FILE).is_file() else None
    if chat is not None:  # a prepared chat dataset
        stream, own = open_prepared(path)
        check_same_tokenizer(path, own, tokenizer, tokenizer_source, "data_path")
        return evaluate_packed(model, tokenizer, stream, chat[0], batch_size=batch_size, seq_len=seq_len,
                               n_batches=n_batches, seed=seed)
    doc_sep = tk.eot_id(tokenizer) if config.document_mask else None
    if path.is_file() and not needs_prepare(path):
        return evaluate(model, tokenizer, read_corpus(path), batch_size=batch_size, seq_len=seq_len,
                        n_batches=n_batches, seed=seed, unknown_chars=unknown_chars, doc_sep=doc_sep)
    stream = open_tokens(path, config.replace(unknown_chars=unknown_chars), tokenizer, tokenizer_source)
    return evaluate_tokens(model, tokenizer, stream.array(), batch_size=batch_size, seq_len=seq_len,
                           n_batches=n_batches, seed=seed, document_mask=config.document_mask)


def _result(nats: float, n_tokens: int, n_windows: int, seq_len: int, n_batches: int | None, n_chars: float,
            n_bytes: float, scored: str = "text") -> EvalResult:
    loss = nats / n_tokens
    bits = nats / math.log(2)
    return EvalResult(loss=loss, perplexity=math.exp(loss), bits_per_token=bits / n_tokens,
                      bits_per_char=bits / max(n_chars, 1.0), n_tokens=n_tokens, n_chars=n_chars,
                      n_windows=n_windows, seq_len=seq_len, mode="all" if n_batches is None else "random",
                      bits_per_byte=bits / max(n_bytes, 1.0), n_bytes=n_bytes, scored=scored)
