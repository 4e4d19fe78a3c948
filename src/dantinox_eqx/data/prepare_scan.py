"""Pass 1 of `prepare` (data/prepare.py): one read of the source that validates it and
computes its digest, size in bytes, documents, characters (char tokenizers) and BPE sample."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from . import sources
from .prepare_progress import PrepareProgress
from .sampling import DataError

__all__ = ["Scan", "scan_source"]


@dataclass
class Scan:
    digest: str
    bytes: int
    documents: int
    seen: np.ndarray  # bool per code point (char tokenizers), or empty
    sample: list[str] = field(default_factory=list)
    sample_bytes: int = 0


def scan_source(src: sources.Source, progress: PrepareProgress, *, chars: bool, sample_bytes: int) -> Scan:
    """One pass over the source: validation, digest, sizes, characters, BPE sample."""
    hasher = hashlib.sha256()
    seen = np.zeros(0x110000 if chars else 0, bool)
    share = min(1.0, sample_bytes / src.size) if sample_bytes and src.size else 1.0
    sample: list[str] = []
    taken, credit, total, docs = 0, 0.0, 0, 0
    progress.start("scan", src.size)
    for piece in src.pieces(hasher=hasher):
        total += piece.nbytes
        docs += piece.doc_end
        if chars:
            seen[np.frombuffer(piece.text.encode("utf-32-le"), np.uint32)] = True
        if taken < sample_bytes:
            credit += share * piece.nbytes
            if credit >= piece.nbytes:
                credit -= piece.nbytes
                sample.append(piece.text)
                taken += piece.nbytes
        progress.advance(piece.nbytes)
    progress.finish()
    if total == 0:
        raise DataError(f"source: {src.spec!r} holds no text (every file or document is empty); pass a source "
                        "with text")
    return Scan(hasher.hexdigest(), total, docs, seen, sample, taken)
