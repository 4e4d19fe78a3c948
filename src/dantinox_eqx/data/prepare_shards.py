"""Pass 2 of `prepare` (data/prepare.py): the source encoded batch by batch into token shards,
each closed atomically (fsync, rename) and recorded with the resume position in .progress.json."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write_text
from . import sources
from .index import PROGRESS_FILE
from .prepare_progress import PrepareProgress

__all__ = ["ShardWriter", "encode_source", "write_json", "BATCH_BYTES", "KILL_ENV"]

BATCH_BYTES = 2 << 20  # text encoded per batch: bounds the ids and the library's Encoding objects
# Test-only seam: SIGKILL this process once this many shards are closed and the next one's
# temporary file holds data (a real kill -9 at a reproducible point; tests/test_prepare.py).
KILL_ENV = "DANTINOX_EQX_PREPARE_KILL_AFTER_SHARDS"


class ShardWriter:
    """Appends ids to the current shard's temporary file; closes shards atomically and records
    each in .progress.json (with the source position after it)."""

    def __init__(self, out: Path, state: dict[str, Any], shard_tokens: int, progress: PrepareProgress):
        self.out, self.state, self.shard_tokens, self.progress = out, state, shard_tokens, progress
        self.dtype = np.dtype(state["dtype"]).newbyteorder("<")
        self.file = None
        self.tokens = self.documents = self.bytes = 0
        self.buffer: list[np.ndarray] = []
        kill = os.environ.get(KILL_ENV)
        self.kill_after = int(kill) if kill else None

    @property
    def name(self) -> str:
        return f"shard_{len(self.state['shards']):05d}.bin"

    def add(self, ids: np.ndarray, piece: sources.Piece) -> None:
        self.buffer.append(ids)
        self.tokens += len(ids)
        self.bytes += piece.nbytes
        self.documents += piece.doc_end
        if self.tokens >= self.shard_tokens and piece.position is not None and (
                piece.doc_end or self.tokens >= 2 * self.shard_tokens):
            self.close(piece.position)

    def flush(self) -> None:
        if not self.buffer:
            return
        if self.file is None:
            self.file = open(self.out / f".{self.name}.tmp", "wb")
        np.concatenate(self.buffer).astype(self.dtype).tofile(self.file)
        self.buffer = []
        if self.kill_after is not None and len(self.state["shards"]) >= self.kill_after:
            self.file.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # the test seam (see KILL_ENV)

    def close(self, position: tuple[int, ...] | None) -> None:
        """Commit the current shard (if it holds tokens): fsync, rename, record, and move on."""
        self.flush()
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
            os.replace(self.out / f".{self.name}.tmp", self.out / self.name)
            self.state["shards"].append({"file": self.name, "tokens": self.tokens, "documents": self.documents,
                                         "bytes": self.bytes})
        self.state["position"] = list(position) if position is not None else None
        write_json(self.out / PROGRESS_FILE, self.state)
        self.tokens = self.documents = self.bytes = 0


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def encode_source(src: sources.Source, shards: ShardWriter, encode: Callable[[list[str]], list[np.ndarray]],
            eot: int | None, start: tuple[int, ...] | None) -> None:
    """Encode the source from `start` into `shards`, batch by batch."""
    tail = np.asarray([eot] if eot is not None else [], np.int32)
    batch: list[sources.Piece] = []
    size = 0

    def run() -> None:
        for piece, ids in zip(batch, encode([p.text for p in batch])):
            shards.add(np.concatenate([ids, tail]) if piece.doc_end else ids, piece)
            shards.progress.advance(piece.nbytes)
        shards.flush()
        batch.clear()

    for piece in src.pieces(start):
        batch.append(piece)
        size += piece.nbytes
        if size >= BATCH_BYTES:
            run()
            size = 0
    if batch:
        run()
