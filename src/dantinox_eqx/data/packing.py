"""Packing chat examples into windows (issue 23): which examples share a window, and reading them.

A chat dataset's flags stream (chat_prepare.py) marks each example's first token (STARTS). A
split is cut into BINS, each at most `window` = max_context + 1 tokens of whole examples,
packed best-fit decreasing (a pure function of the data, O(examples) memory; on many short
examples it leaves only the last bins partly empty). An example longer than the window is cut
to it (a bin of its own; counted in `examples_cut`), or dropped when the cut leaves it no
trained token (its answer is past the window; counted in `answers_truncated`): a prompt-only
example is never trained on. A batch row is one bin padded to the window (token 0, untrained,
a segment of its own); attention and positions restart at each example (the STARTS bits
become `segment_ids` in train/step.py), so a packed window computes what each example
computes alone. `real_fraction` is the share of
the bins' window slots holding real tokens (the rest is padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .chat_data import STARTS, TRAINED
from .sampling import DataError

TokenStream = Any  # tokens.TokenStream (tokens.py imports this module: no import back)

__all__ = ["Packing", "example_starts", "pack", "read_bins", "chat_splits"]


@dataclass(frozen=True)
class Packing:
    offsets: np.ndarray  # (n_items,) int64: each packed example's first token in its stream
    lengths: np.ndarray  # (n_items,) int64: its tokens (<= window: an example cut to the window)
    bins: np.ndarray  # (n_bins + 1,) int64: bin b holds items bins[b]:bins[b + 1]
    window: int
    stats: dict[str, Any]

    def __len__(self) -> int:
        return len(self.bins) - 1


def example_starts(flags: TokenStream, chunk: int = 1 << 22) -> np.ndarray:
    """The offsets (int64, relative to the stream) of every example's first token."""
    out = []
    for a in range(0, len(flags), chunk):
        n = min(chunk, len(flags) - a)
        block = flags.read(np.array([a]), n)[0]
        out.append(np.flatnonzero(block & STARTS) + a)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _best_fit_decreasing(lengths: np.ndarray, window: int) -> list[list[int]]:
    """Item indices per bin: items longest first (ties in stream order), each into the open bin
    with the least room that fits it (a new bin when none does). Deterministic; O(n * window)."""
    room_bins: list[list[int]] = [[] for _ in range(window + 1)]  # open bins by their room left
    open_at = np.zeros(window + 1, np.int64)  # how many open bins have each room
    bins: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        fits = np.flatnonzero(open_at[n:])
        if len(fits):
            room = n + int(fits[0])
            b = room_bins[room].pop()
            open_at[room] -= 1
        else:
            room, b = window, len(bins)
            bins.append([])
        bins[b].append(i)
        room_bins[room - n].append(b)
        open_at[room - n] += 1
    return bins


def pack(flags: TokenStream, window: int) -> Packing:
    """The bins of a split (module docstring). `window`: tokens per batch row (max_context + 1)."""
    starts = example_starts(flags)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts]).astype(np.int64)  # a split cut mid-example: its head is one
    lengths = np.append(starts[1:], len(flags)) - starts
    keep = np.ones(len(starts), bool)
    cut = dropped = 0
    for i in np.flatnonzero(lengths > window).tolist():  # cut to the window, or dropped without an answer
        head = flags.read(np.array([starts[i]]), window)[0]
        if np.any(head[1:] & TRAINED):
            cut += 1
        else:
            dropped += 1
            keep[i] = False
    offsets, lengths = starts[keep], np.minimum(lengths[keep], window)
    groups = _best_fit_decreasing(lengths, window)
    order = np.asarray([i for g in groups for i in g], np.int64)
    bins = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(np.int64)
    stats = {"examples": int(len(starts)), "bins": len(groups), "examples_cut": cut, "answers_truncated": dropped,
             "real_fraction": round(float(lengths.sum() / max(len(groups) * window, 1)), 4)}
    return Packing(offsets[order], lengths[order], bins, window, stats)


def read_bins(tokens: TokenStream, flags: TokenStream, packing: Packing, bins: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Bins `bins` (any shape) read and padded to the window: (tokens int32, flags int32), each
    (*bins.shape, window). Padding is token 0, untrained, starting a segment of its own."""
    shape, W = bins.shape, packing.window
    flat = bins.reshape(-1)
    out_t = np.zeros((len(flat), W), np.int32)
    out_f = np.zeros((len(flat), W), np.int32)
    for r, b in enumerate(flat.tolist()):
        at = 0
        for i in range(int(packing.bins[b]), int(packing.bins[b + 1])):
            off, n = int(packing.offsets[i]), int(packing.lengths[i])
            out_t[r, at:at + n] = tokens.read(np.array([off]), n)[0]
            out_f[r, at:at + n] = flags.read(np.array([off]), n)[0]
            out_f[r, at] = STARTS  # each example its own segment, its first token never a target
            at += n
        if at < W:
            out_f[r, at] = STARTS
    return out_t.reshape(*shape, W), out_f.reshape(*shape, W)


def _next_start(flags: TokenStream, at: int, chunk: int = 1 << 16) -> int:
    """The first example start at or after `at` (len(flags) when none)."""
    while at < len(flags):
        n = min(chunk, len(flags) - at)
        hits = np.flatnonzero(flags.read(np.array([at]), n)[0] & STARTS)
        if len(hits):
            return at + int(hits[0])
        at += n
    return len(flags)


def chat_splits(stream: TokenStream, flags: TokenStream, chat: dict[str, Any], config: Any,
                val: tuple[TokenStream, TokenStream] | None = None) -> tuple:
    """(train, val, train_flags, val_flags, {"train", "val"}: Packing, the summary's "chat" entry)
    of a chat dataset: validation is the examples of its last `val_fraction` of tokens (cut at an
    example start), or `val` (tokens, flags: a separate chat dataset, `val_path`), training the
    rest capped at `max_train_tokens` (whole examples); each split packed into windows of
    max_context + 1."""
    cut = len(stream) if val is not None else _next_start(flags, len(stream) - int(len(stream) * config.val_fraction))
    top = _next_start(flags, config.max_train_tokens) if config.max_train_tokens < cut else cut
    top = min(top, cut)
    val_tokens, val_flags = val if val is not None else (stream.view(cut, len(stream)), flags.view(cut, len(stream)))
    views = stream.view(0, top), val_tokens, flags.view(0, top), val_flags
    packs = {"train": pack(views[2], config.max_context + 1), "val": pack(views[3], config.max_context + 1)}
    for name, p in packs.items():
        if len(p) == 0 and name == "val" and val is not None:
            raise DataError(f"val_path: the chat validation data has no example that fits a window of "
                            f"{config.max_context + 1} tokens with a trained token; use other validation data")
        if len(p) == 0:
            raise DataError(f"data_path: the chat data's {name} split has no example (val_fraction "
                            f"{config.val_fraction}, {chat['examples']} examples); use more data or another "
                            "val_fraction")
    info = dict(chat) | {f"{name}_packing": p.stats for name, p in packs.items()}
    info["real_fraction"] = packs["train"].stats["real_fraction"]
    return (*views, packs, info)
