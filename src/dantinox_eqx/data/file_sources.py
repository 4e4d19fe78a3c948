"""File sources (kinds text, folder, jsonl, parquet; see data/sources.py): a sorted list of
files read in pieces, resumable at a position, feeding their names, sizes and bytes to a hasher."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..files import sha256_file
from .pieces import Piece, Source, cut_point, decode, doc_pieces
from .sampling import DataError

__all__ = ["FileSource", "TextFiles", "JsonlFiles", "ParquetFiles", "ROWS_PER_BATCH"]

ROWS_PER_BATCH = 1024  # Parquet and HF rows decoded at a time


class FileSource(Source):
    """A sorted list of files, each named relative to `root` in the digest."""

    def __init__(self, kind: str, spec: str, files: list[Path], root: Path, text_field: str | None,
                 piece_bytes: int):
        self.kind, self.spec, self.files, self.root = kind, spec, files, root
        self.text_field, self.piece_bytes = text_field, piece_bytes
        stats = [f.stat() for f in files]
        self.size = sum(s.st_size for s in stats)
        self.stat = [[self._name(f), s.st_size, s.st_mtime_ns] for f, s in zip(files, stats)]

    def _name(self, path: Path) -> str:
        return os.path.relpath(path, self.root) if path != self.root else path.name

    def _header(self, hasher: Any, path: Path, size: int) -> None:
        if hasher is not None:
            hasher.update(f"{self.kind}\0{self.text_field}\0{self._name(path)}\0{size}\0".encode())


class TextFiles(FileSource):
    """Each file is one document, read `piece_bytes` at a time from a byte offset."""

    def pieces(self, start=None, hasher=None):
        first, offset = start or (0, 0)
        for i in range(first, len(self.files)):
            path = self.files[i]
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._header(hasher, path, size)
                pos = offset if i == first else 0
                while pos < size:
                    f.seek(pos)
                    raw = f.read(self.piece_bytes)
                    if not raw:
                        break
                    if pos + len(raw) < size:
                        raw = raw[:cut_point(raw)]
                    if hasher is not None:
                        hasher.update(raw)
                    text = decode(raw, path, pos)
                    pos += len(raw)
                    end = pos >= size
                    yield Piece(text, len(raw), end, (i + 1, 0) if end else (i, pos))


class JsonlFiles(FileSource):
    """One document per line: the line's `text_field`. Position: (file, byte offset, line)."""

    def pieces(self, start=None, hasher=None):
        first, offset, line_no = start or (0, 0, 0)
        field = self.text_field
        for i in range(first, len(self.files)):
            path = self.files[i]
            if i != first:
                offset, line_no = 0, 0
            with open(path, "rb") as f:
                self._header(hasher, path, os.fstat(f.fileno()).st_size)
                f.seek(offset)
                for raw in f:
                    line_no += 1
                    offset += len(raw)
                    if hasher is not None:
                        hasher.update(raw)
                    if not raw.strip():
                        continue
                    try:
                        row = json.loads(raw)
                    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                        why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                        raise DataError(f"source: {str(path)}:{line_no} is not a JSON object ({why}); fix or "
                                        "remove that line") from None
                    if not isinstance(row, dict) or field not in row:
                        keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                        raise DataError(f"source: {str(path)}:{line_no} has no {field!r} field (it has: {keys}); "
                                        "pass --text_field NAME (dataset_text_field) naming the text field")
                    text = row[field]
                    if text is None or text == "":
                        continue
                    if not isinstance(text, str):
                        raise DataError(f"source: {str(path)}:{line_no}: field {field!r} holds "
                                        f"{type(text).__name__}, not text; pass --text_field NAME naming "
                                        "a text field")
                    yield from doc_pieces(text, (i, offset, line_no), self.piece_bytes)


class ParquetFiles(FileSource):
    """One document per row of the string column `text_field`. Position: (file, row)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pq = pq
        for path in self.files:  # every file's schema before anything is read
            try:
                schema = pq.read_schema(path)
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"source: {str(path)!r} is not a Parquet file ({e}); remove it or "
                                "convert it") from None
            if self.text_field not in schema.names:
                raise DataError(f"source: {str(path)!r} has no column {self.text_field!r} (columns: "
                                f"{', '.join(schema.names)}); pass --text_field NAME (dataset_text_field) "
                                "naming the text column")
            kind = schema.field(self.text_field).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise DataError(f"source: {str(path)!r}: column {self.text_field!r} is {kind}, not text; "
                                "pass --text_field NAME naming a string column")

    def pieces(self, start=None, hasher=None):
        import pyarrow.compute as pc

        first, row = start or (0, 0)
        for i in range(first, len(self.files)):
            path = self.files[i]
            if i != first:
                row = 0
            self._header(hasher, path, path.stat().st_size)
            if hasher is not None:
                sha256_file(path, into=hasher)
            pf = self._pq.ParquetFile(path)
            groups, skip, seen = [], row, 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if seen + n > row:
                    groups.append(g)
                else:
                    skip -= n
                seen += n
            if not groups:
                continue
            for batch in pf.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=groups,
                                         columns=[self.text_field], use_threads=False):
                column = batch.column(0)
                if skip:
                    column, skip = column.slice(min(skip, len(column))), max(0, skip - len(column))
                sizes = pc.binary_length(column).to_pylist()
                for text, nbytes in zip(column.to_pylist(), sizes):
                    row += 1
                    if not text:
                        continue
                    if nbytes <= self.piece_bytes:
                        yield Piece(text, nbytes, True, (i, row))
                    else:
                        yield from doc_pieces(text, (i, row), self.piece_bytes)
