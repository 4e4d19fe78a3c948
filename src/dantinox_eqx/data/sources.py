"""Documents streamed from a source in bounded pieces: the input side of `prepare`.

A source is opened with `open_source(spec, ...)`; what `spec` is decides its kind:

    text     one UTF-8 text file (any name but *.jsonl / *.parquet) = ONE document
    folder   a folder (walked recursively, in sorted path order; hidden files and folders and
             the token caches `*.tokens.npy` skipped) or a glob of text files: one document per file
    jsonl    a *.jsonl file, or a folder or glob of them: one document per line, its `text_field`
             (blank lines skipped)
    parquet  a *.parquet file, or a folder or glob of them: one document per row of the string
             column `text_field`, read one row group at a time in batches of rows
    hf       `HFDataset(name, config, split, text_field, streaming)`: a Hugging Face `datasets`
             dataset (`load_dataset`; a `save_to_disk` folder through `load_from_disk`)

A folder or glob mixing kinds (text with *.jsonl or *.parquet) is refused. Empty documents
(an empty string or null text, an empty file) are skipped.

`Source.pieces(start)` yields `Piece`s in order: document text cut into pieces of at most
`PIECE_BYTES` UTF-8 bytes (data/pieces.py: how text is cut). A text file is read one piece at
a time (a 50 GB file: 64 KiB at a time); a JSONL line, a Parquet row or an HF row is read
whole, then cut. `Piece.position` is where the stream continues after that piece (a tuple of ints, or None
inside a JSONL/Parquet/HF document); `pieces(position)` resumes there, seeking instead of
re-reading where the kind allows (text, folder, jsonl: byte offsets; parquet: row groups).

`pieces(start, hasher=h)` also feeds the source's identity and raw content to `h`
(`hashlib.sha256()`): the file names relative to the source's root, their sizes and bytes, the
text field; for hf the name, config, split, text field and the dataset's fingerprint. Bad input
raises `DataError` naming the file (and line or row) and the fix: a missing path, a glob that
matches nothing, an empty folder, a binary or non-UTF-8 file, a malformed JSONL line, a missing
text field or column, text that is not a string.

Modules, one job each: data/pieces.py (Piece, Source, cutting and decoding), data/file_sources.py
(text, folder, jsonl, parquet), data/hf_source.py (hf); this one opens a spec as one of them.
"""

from __future__ import annotations

import glob as globlib
import os
from pathlib import Path

from .file_sources import JsonlFiles, ParquetFiles, TextFiles
from .hf_source import HFDataset, HFSource
from .pieces import PIECE_BYTES, Piece, Source, cut_text
from .sampling import DataError

__all__ = ["PIECE_BYTES", "Piece", "HFDataset", "Source", "open_source", "cut_text"]

_MAGIC = set("*?[")


def _kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _walk(folder: Path, exclude: Path | None) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or (here / d).resolve() != exclude))
        found += [here / f for f in filenames if not f.startswith(".") and not f.endswith(".tokens.npy")]
    return sorted(found)


def open_source(spec: str | os.PathLike | HFDataset, *, text_field: str = "text",
                exclude: str | os.PathLike | None = None, piece_bytes: int = PIECE_BYTES) -> Source:
    """Open `spec` (a path, a glob, or an `HFDataset`); see the module docstring for the kinds.
    Files under `exclude` (the output folder of `prepare`) are never part of the source.
    Raises DataError for a missing path, an empty folder, a glob without matches, a folder of
    mixed kinds, or a prepared dataset given as a source."""
    if isinstance(spec, HFDataset):
        return HFSource(spec, piece_bytes)
    text = os.fspath(spec)
    path = Path(text).expanduser()
    excluded = Path(exclude).resolve() if exclude is not None else None
    if any(c in _MAGIC for c in text) and not path.exists():
        pattern = str(Path(text).expanduser().absolute())
        files = sorted(Path(p) for p in globlib.glob(pattern, recursive=True) if Path(p).is_file()
                       and (excluded is None or excluded not in Path(p).resolve().parents))
        if not files:
            raise DataError(f"source: the glob {text!r} matches no files; check the pattern")
        fixed = pattern[:min(pattern.index(c) for c in _MAGIC if c in pattern)]  # before the first wildcard
        root = Path(fixed) if fixed.endswith(os.sep) else Path(fixed).parent
        kinds = {_kind_of(f) for f in files}
        kind, name = (kinds.pop() if len(kinds) == 1 else None), pattern
    elif path.is_dir():
        if (path / "index.json").is_file() and (path / "tokenizer.json").is_file():
            raise DataError(f"source: {text!r} is already a prepared dataset; pass it to train as data_path, "
                            "or give prepare the raw text")
        files = _walk(path, excluded)
        if not files:
            raise DataError(f"source: the folder {text!r} holds no files; put text, .jsonl or .parquet files "
                            "in it, or pass another folder")
        root, name = path.absolute(), str(path.absolute())
        kinds = {_kind_of(f) for f in files}
        kind = kinds.pop() if len(kinds) == 1 else None
    elif path.is_file():
        files, root, name = [path.absolute()], path.absolute(), str(path.absolute())
        kinds = {_kind_of(path)}
        kind = next(iter(kinds))
    else:
        raise DataError(f"source: {text!r} does not exist; pass a text file, a folder, a glob, a .jsonl or "
                        ".parquet file (or set dataset_source: hf)")
    if kind is None:
        raise DataError(f"source: {text!r} mixes text, .jsonl and .parquet files; pass one kind (a glob such "
                        "as DIR/*.jsonl picks them)")
    if kind == "text":
        return TextFiles("text" if path.is_file() else "folder", name, files, root, None, piece_bytes)
    cls = JsonlFiles if kind == "jsonl" else ParquetFiles
    return cls(kind, name, files, root, text_field, piece_bytes)
