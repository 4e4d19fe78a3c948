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
`PIECE_BYTES` UTF-8 bytes. A text file is read one piece at a time (a 50 GB file: 64 KiB at a
time); a JSONL line, a Parquet row or an HF row is read whole, then cut. Long text is cut after a newline that has a
non-whitespace character on both sides, where possible: byte-level BPE (GPT-2's regex
pre-tokenizer) and char tokenizers then give exactly the ids of the uncut text (a test shows
it). `Piece.position` is where the stream continues after that piece (a tuple of ints, or None
inside a JSONL/Parquet/HF document); `pieces(position)` resumes there, seeking instead of
re-reading where the kind allows (text, folder, jsonl: byte offsets; parquet: row groups).

`pieces(start, hasher=h)` also feeds the source's identity and raw content to `h`
(`hashlib.sha256()`): the file names relative to the source's root, their sizes and bytes, the
text field; for hf the name, config, split, text field and the dataset's fingerprint. Bad input
raises `DataError` naming the file (and line or row) and the fix: a missing path, a glob that
matches nothing, an empty folder, a binary or non-UTF-8 file, a malformed JSONL line, a missing
text field or column, text that is not a string.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sampling import DataError

__all__ = ["PIECE_BYTES", "Piece", "HFDataset", "Source", "open_source", "cut_text"]

PIECE_BYTES = 1 << 16  # the most UTF-8 bytes of text in one piece (a long document is cut); smaller
# pieces bound the tokenizers library's per-call memory (~200 bytes per byte of text for byte-level BPE)
_MAGIC = set("*?[")
_ROWS_PER_BATCH = 1024  # Parquet and HF rows decoded at a time


@dataclass(frozen=True)
class Piece:
    """A piece of one document: `text`, its UTF-8 size `nbytes`, whether it ends its document,
    and `position`, where the stream continues after it (None: not a resume point)."""

    text: str
    nbytes: int
    doc_end: bool
    position: tuple[int, ...] | None


@dataclass(frozen=True)
class HFDataset:
    """A Hugging Face `datasets` dataset (Config's dataset_name, dataset_config, dataset_split,
    dataset_text_field and streaming). `name`: a hub id (the local cache serves it offline), a
    local dataset folder (data files that `load_dataset` reads) or a `save_to_disk` folder."""

    name: str
    config: str = ""
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> HFDataset:
        if not (name or config.dataset_name):
            raise DataError("dataset_name: dataset_source is hf but no dataset is named; set dataset_name "
                            "(a hub id or a local dataset folder)")
        return cls(name or config.dataset_name, config.dataset_config, config.dataset_split,
                   config.dataset_text_field, config.streaming)


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


# ------------------------------------------------------------------------------ text helpers
def _last_char(raw: bytes, end: int) -> str:
    return raw[max(0, end - 4):end].decode("utf-8", errors="ignore")[-1:]


def _first_char(raw: bytes, start: int) -> str:
    return raw[start:start + 4].decode("utf-8", errors="ignore")[:1]


def _cut(raw: bytes) -> int:
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
    """`text` in pieces of at most `piece_bytes` UTF-8 bytes, cut as `_cut` says (a document
    from JSONL, Parquet or HF that is longer than one piece)."""
    if len(text) <= piece_bytes // 4:  # at most 4 bytes a character: fits, no encoding needed
        yield text
        return
    raw, off = text.encode("utf-8"), 0
    while len(raw) - off > piece_bytes:
        window = raw[off:off + piece_bytes]
        cut = _cut(window)
        yield window[:cut].decode("utf-8")
        off += cut
    if off < len(raw):
        yield raw[off:].decode("utf-8")


def _doc_pieces(text: str, position: tuple[int, ...], piece_bytes: int) -> Iterator[Piece]:
    """One whole document as pieces; only its last piece is a resume point."""
    held = None
    for part in cut_text(text, piece_bytes):
        if held is not None:
            yield Piece(held, len(held.encode("utf-8")), False, None)
        held = part
    if held is not None:
        yield Piece(held, len(held.encode("utf-8")), True, position)


def _decode(raw: bytes, path: Path, offset: int) -> str:
    zero = raw.find(b"\0")
    if zero >= 0:
        raise DataError(f"source: {str(path)!r} is a binary file (NUL byte at offset {offset + zero}), not "
                        "text; remove it from the source folder or pass a glob that leaves it out")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"source: {str(path)!r} is not UTF-8 text (undecodable byte at offset "
                        f"{offset + e.start}); convert it to UTF-8 or leave it out of the source") from None


# ------------------------------------------------------------------------------ file sources
class _Files(Source):
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


class _TextFiles(_Files):
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
                        raw = raw[:_cut(raw)]
                    if hasher is not None:
                        hasher.update(raw)
                    text = _decode(raw, path, pos)
                    pos += len(raw)
                    end = pos >= size
                    yield Piece(text, len(raw), end, (i + 1, 0) if end else (i, pos))


class _JsonlFiles(_Files):
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
                    yield from _doc_pieces(text, (i, offset, line_no), self.piece_bytes)


class _ParquetFiles(_Files):
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
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        hasher.update(block)
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
            for batch in pf.iter_batches(batch_size=_ROWS_PER_BATCH, row_groups=groups,
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
                        yield from _doc_pieces(text, (i, row), self.piece_bytes)


# ------------------------------------------------------------------------------ Hugging Face
class _HF(Source):
    kind = "hf"

    def __init__(self, hf: HFDataset, piece_bytes: int):
        self.hf, self.piece_bytes = hf, piece_bytes
        self.spec, self.text_field = hf.name, hf.text_field
        self.ds = _load_hf(hf)
        info = getattr(self.ds, "info", None)
        self.size = getattr(info, "dataset_size", None) or None
        fingerprint = getattr(self.ds, "_fingerprint", None)  # a Dataset's content hash
        if fingerprint is None:  # a stream has none: its builder, version and sizes stand in
            fingerprint = json.dumps([getattr(info, k, None) and str(getattr(info, k)) for k in
                                      ("builder_name", "config_name", "version", "dataset_size", "splits")])
        self.stat = [hf.name, hf.config, hf.split, hf.text_field, hf.streaming, fingerprint]
        self.identity = json.dumps(self.stat)
        names = getattr(self.ds, "column_names", None)
        if names is not None and hf.text_field not in names:
            raise DataError(f"dataset_text_field: the dataset {hf.name!r} ({hf.split}) has no field "
                            f"{hf.text_field!r} (fields: {', '.join(names)}); set dataset_text_field "
                            "(--text_field) to its text field")

    def pieces(self, start=None, hasher=None):
        if hasher is not None:
            hasher.update(self.identity.encode())
        row = start[0] if start else 0
        field = self.hf.text_field
        ds = self.ds.select_columns([field]) if field in (self.ds.column_names or ()) else self.ds
        ds = ds.skip(row) if row else ds
        for batch in ds.iter(batch_size=_ROWS_PER_BATCH):
            if field not in batch:
                raise DataError(f"dataset_text_field: the dataset {self.hf.name!r} has no field {field!r} "
                                f"(fields: {', '.join(batch)}); set dataset_text_field (--text_field)")
            for text in batch[field]:
                row += 1
                if not text:
                    continue
                if not isinstance(text, str):
                    raise DataError(f"dataset_text_field: row {row} of {self.hf.name!r} holds "
                                    f"{type(text).__name__} in {field!r}, not text; name a text field")
                yield from _doc_pieces(text, (row,), self.piece_bytes)


def _load_hf(hf: HFDataset) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("dataset_source: hf needs the `datasets` package; install it with "
                        "pip install 'dantinox-eqx[hf-data]'") from None
    try:
        folder = Path(hf.name).expanduser()
        if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():  # save_to_disk
            ds = datasets.load_from_disk(str(folder))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[hf.split]
            return ds.to_iterable_dataset() if hf.streaming else ds
        return datasets.load_dataset(hf.name, hf.config or None, split=hf.split, streaming=hf.streaming)
    except KeyError:
        raise DataError(f"dataset_split: the dataset {hf.name!r} has no split {hf.split!r}; set "
                        "dataset_split") from None
    except Exception as e:  # datasets raises many types (hub, offline, builder errors): one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"dataset_name: cannot load the Hugging Face dataset {hf.name!r} (config "
                        f"{hf.config or 'default'!r}, split {hf.split!r}): {first}; check the name, or "
                        "download it once while online (the local cache then serves it offline)") from None


# ------------------------------------------------------------------------------ open_source
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
        return _HF(spec, piece_bytes)
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
        return _TextFiles("text" if path.is_file() else "folder", name, files, root, None, piece_bytes)
    cls = _JsonlFiles if kind == "jsonl" else _ParquetFiles
    return cls(kind, name, files, root, text_field, piece_bytes)
