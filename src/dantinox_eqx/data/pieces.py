"""Documents cut into bounded pieces: `Piece`, the `Source` interface, and the cutting and
decoding every source kind shares (data/sources.py describes the kinds and opens them).

`Source.pieces(start)` yields `Piece`s in order: document text cut into pieces of at most
`PIECE_BYTES` UTF-8 bytes. Long text is cut after a newline that has a non-whitespace character
on both sides, where possible (`cut_text`): byte-level BPE (GPT-2's regex pre-tokenizer) and
char tokenizers then give exactly the ids of the uncut text (a test shows it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sampling import DataError

__all__ = ["PIECE_BYTES", "Piece", "Source", "cut_text", "cut_point", "doc_pieces", "decode"]

PIECE_BYTES = 1 << 16  # the most UTF-8 bytes of text in one piece (a long document is cut); smaller
# pieces bound the tokenizers library's per-call memory (~200 bytes per byte of text for byte-level BPE)


@dataclass(frozen=True)
class Piece:
    """A piece of one document: `text`, its UTF-8 size `nbytes`, whether it ends its document,
    and `position`, where the stream continues after it (None: not a resume point)."""

    text: str
    nbytes: int
    doc_end: bool
    position: tuple[int, ...] | None


class Source:
    """An opened source; see the module docstring. Attributes: `kind`, `spec` (the absolute
    path or glob, or the hf dataset name), `text_field` (None for text sources), `size` (bytes
    on disk: a cheap size estimate; None when unknown) and `stat` (a JSON list: the names, sizes
    and mtimes of its files, a cheap identity that says "unchanged" without reading the bytes)."""

    kind: str
    spec: str
    text_field: str | None = None
    size: int | None = None
    stat: list[Any]

    def pieces(self, start: tuple[int, ...] | None = None, hasher: Any = None) -> Iterator[Piece]:
        raise NotImplementedError


# ------------------------------------------------------------------------------ cutting and decoding
def _last_char(raw: bytes, end: int) -> str:
    return raw[max(0, end - 4):end].decode("utf-8", errors="ignore")[-1:]


def _first_char(raw: bytes, start: int) -> str:
    return raw[start:start + 4].decode("utf-8", errors="ignore")[:1]


def cut_point(raw: bytes) -> int:
    """Where to end a piece taken from the front of `raw` (a full read; more follows): after
    the last newline with a non-whitespace character on both sides, else after the last newline,
    else at the last UTF-8 character boundary."""
    floor = len(raw) // 2
    nl = raw.rfind(b"\n", 0, len(raw) - 1)
    while nl > floor:
        before, after = _last_char(raw, nl), _first_char(raw, nl + 1)
        if before and after and not before.isspace() and not after.isspace():
            return nl + 1
        nl = raw.rfind(b"\n", 0, nl)
    nl = raw.rfind(b"\n")
    if nl >= 0:
        return nl + 1
    end = len(raw)
    while end > 0 and raw[end - 1] & 0xC0 == 0x80:  # inside a multi-byte character: back off
        end -= 1
    end = end - 1 if end and raw[end - 1] >= 0xC0 else end
    return end if end > 0 else len(raw)  # not UTF-8 at all: the decoder will say so


def cut_text(text: str, piece_bytes: int = PIECE_BYTES) -> Iterator[str]:
    """`text` in pieces of at most `piece_bytes` UTF-8 bytes, cut as `cut_point` says (a document
    from JSONL, Parquet or HF that is longer than one piece)."""
    if len(text) <= piece_bytes // 4:  # at most 4 bytes a character: fits, no encoding needed
        yield text
        return
    raw, off = text.encode("utf-8"), 0
    while len(raw) - off > piece_bytes:
        window = raw[off:off + piece_bytes]
        cut = cut_point(window)
        yield window[:cut].decode("utf-8")
        off += cut
    if off < len(raw):
        yield raw[off:].decode("utf-8")


def doc_pieces(text: str, position: tuple[int, ...], piece_bytes: int) -> Iterator[Piece]:
    """One whole document as pieces; only its last piece is a resume point."""
    held = None
    for part in cut_text(text, piece_bytes):
        if held is not None:
            yield Piece(held, len(held.encode("utf-8")), False, None)
        held = part
    if held is not None:
        yield Piece(held, len(held.encode("utf-8")), True, position)


def decode(raw: bytes, path: Path, offset: int) -> str:
    zero = raw.find(b"\0")
    if zero >= 0:
        raise DataError(f"source: {str(path)!r} is a binary file (NUL byte at offset {offset + zero}), not "
                        "text; remove it from the source folder or pass a glob that leaves it out")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"source: {str(path)!r} is not UTF-8 text (undecodable byte at offset "
                        f"{offset + e.start}); convert it to UTF-8 or leave it out of the source") from None
