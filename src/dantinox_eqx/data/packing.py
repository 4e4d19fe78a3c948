"""Packing chat examples into windows (issue 23): which examples share a window, and reading them.

A chat dataset's flags stream (chat_prepare.py) marks each example's first token (STARTS). A
split is cut into BINS, each at most `window` = max_context + 1 tokens: a run of consecutive
whole examples, packed greedily in stream order (no reordering: a pure function of the data,
O(examples) memory). An example longer than the window is cut to it (a bin of its own; counted
in `examples_cut`), or dropped when the cut leaves it no trained token (its answer is past the
window; counted in `answers_truncated`): a prompt-only example is never trained on. A batch row
is one bin padded to the window (token 0, untrained, a segment of its own); attention and
positions restart at each example (the STARTS bits become `segment_ids` in train/step.py), so
a packed window computes what each example computes alone. `real_fraction` is the share of
the bins' window slots holding real tokens (the rest is padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .chat_data import STARTS, TRAINED

if TYPE_CHECKING:  # tokens.py imports this module
    from .tokens import TokenStream

__all__ = ["Packing", "example_starts", "pack", "read_bins"]


@dataclass(frozen=True)
class Packing:
    offsets: np.ndarray  # (n_bins,) int64: each bin's first token in its stream
    lengths: np.ndarray  # (n_bins,) int64: its real tokens (<= window)
    window: int
    stats: dict[str, Any]

    def __len__(self) -> int:
        return len(self.offsets)


def example_starts(flags: TokenStream, chunk: int = 1 << 22) -> np.ndarray:
    """The offsets (int64, relative to the stream) of every example's first token."""
    out = []
    for a in range(0, len(flags), chunk):
        n = min(chunk, len(flags) - a)
        block = flags.read(np.array([a]), n)[0]
        out.append(np.flatnonzero(block & STARTS) + a)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def pack(flags: TokenStream, window: int) -> Packing:
    """The bins of a split (module docstring). `window`: tokens per batch row (max_context + 1)."""
    starts = example_starts(flags)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts]).astype(np.int64)  # a split cut mid-example: its head is one
    ends = np.append(starts[1:], len(flags))
    offsets, lengths = [], []
    cut = dropped = 0
    cur_off, cur_len = 0, 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        n = e - s
        if n > window:
            if cur_len:
                offsets.append(cur_off), lengths.append(cur_len)
                cur_len = 0
            head = flags.read(np.array([s]), window)[0]
            if np.any(head[1:] & TRAINED):
                offsets.append(s), lengths.append(window)
                cut += 1
            else:
                dropped += 1
            continue
        if cur_len and cur_off + cur_len == s and cur_len + n <= window:
            cur_len += n
        else:
            if cur_len:
                offsets.append(cur_off), lengths.append(cur_len)
            cur_off, cur_len = s, n
    if cur_len:
        offsets.append(cur_off), lengths.append(cur_len)
    offsets, lengths = np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)
    stats = {"examples": int(len(starts)), "bins": int(len(offsets)), "examples_cut": cut,
             "answers_truncated": dropped,
             "real_fraction": round(float(lengths.sum() / max(len(offsets) * window, 1)), 4)}
    return Packing(offsets, lengths, window, stats)


def read_bins(tokens: TokenStream, flags: TokenStream, packing: Packing, bins: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Bins `bins` (any shape) read and padded to the window: (tokens int32, flags int32), each
    (*bins.shape, window). Padding is token 0, untrained, starting a segment of its own."""
    shape, W = bins.shape, packing.window
    flat = bins.reshape(-1)
    out_t = np.zeros((len(flat), W), np.int32)
    out_f = np.zeros((len(flat), W), np.int32)
    for r, b in enumerate(flat.tolist()):
        off, n = int(packing.offsets[b]), int(packing.lengths[b])
        out_t[r, :n] = tokens.read(np.array([off]), n)[0]
        out_f[r, :n] = flags.read(np.array([off]), n)[0]
        if n < W:
            out_f[r, n] = STARTS
    return out_t.reshape(*shape, W), out_f.reshape(*shape, W)
