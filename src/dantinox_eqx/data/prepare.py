"""A source (text, folder, glob, JSONL, Parquet, Hugging Face) -> a prepared dataset directory of
token shards, streamed with bounded memory, atomic per shard and resumable.

    prepare_dataset("corpus/", "data/corpus.tokens", tokenizer_type="bpe", bpe_vocab_size=8192)

The directory's format (file names, index.json): data/index.py.

How it runs, in two passes over the source (`sources.py` streams it in pieces of <= 64 KiB):
1. scan: validates everything (binary files, malformed JSONL lines, missing fields or
   columns; nothing is written before it passed), computes the source's digest, counts its
   bytes (for the progress bar's ETA), collects the characters (char tokenizers) and the BPE
   training sample: about `bpe_sample_bytes` (default 64 MB) of text spread evenly over the
   source (each piece is taken when the running share `bpe_sample_bytes / source size` of the
   bytes read so far covers it; a source of unknown size, a streamed HF dataset, gives its
   first `bpe_sample_bytes`). The trainer reads that sample one piece at a time.
2. encode: pieces are encoded in batches of about `BATCH_BYTES` of text (the `tokenizers`
   library's multi-threaded batch encoding; char vocabularies by a numpy lookup table, the
   same ids) and appended to the current shard's temporary file. Every document is followed by
   the end-of-text token. A shard is closed at the first document end once it holds
   `shard_tokens` tokens (default 2**27: 256 MiB of uint16); a single document longer than
   2 * shard_tokens (a big text file is one document) is cut inside, at a piece boundary.
   Closing renames the temporary file and then rewrites .progress.json (atomic): a prepare
   killed at any point resumes after its last closed shard, and the shards come out
   byte-identical to an uninterrupted prepare's.

Peak memory does not depend on the corpus: one batch of text and its ids, the BPE sample and
the trainer's word counts (bounded by `bpe_sample_bytes`), and a 1.1 M-entry table of code
points. An `out_dir` that holds another source's dataset (finished or not), or anything that is
not a prepared dataset, is refused (FileExistsError) before anything is written; the same
source and settings again is "already prepared" (a finished one) or a resume.

Tokenizers: `tokenizer=None` trains one (`tokenizer_type` "char": every character of the
source; "bpe": `bpe_vocab_size` entries from the sample), or pass a tokenizer.json path (any,
e.g. GPT-2's) or a `tokenizers.Tokenizer`. One without an end-of-text token (char and bpe
files written before they existed) keeps its ids: documents are then joined with no
separator and index.json says `"eot_id": null`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..files import atomic_write_text
from . import sources
from . import tokenizer as tk
from .index import FORMAT, INDEX_FILE, PROGRESS_FILE, TOKENIZER_FILE, VERSION, dtype_name, is_prepared, read_index
from .sampling import DataError

__all__ = ["FORMAT", "INDEX_FILE", "TOKENIZER_FILE", "DEFAULT_SHARD_TOKENS", "DEFAULT_BPE_SAMPLE_BYTES",
           "prepare_dataset", "read_index", "is_prepared"]

DEFAULT_SHARD_TOKENS = 2 ** 27
DEFAULT_BPE_SAMPLE_BYTES = 64_000_000
BATCH_BYTES = 2 << 20  # text encoded per batch: bounds the ids and the library's Encoding objects
# Test-only seam: SIGKILL this process once this many shards are closed and the next one's
# temporary file holds data (a real kill -9 at a reproducible point; tests/test_prepare.py).
_KILL_ENV = "DANTINOX_EQX_PREPARE_KILL_AFTER_SHARDS"


# ------------------------------------------------------------------------------ progress
class _Progress:
    """A rich bar (MB, MB/s, ETA) on a terminal; a plain line every `every` seconds and at the
    end of each phase otherwise; nothing when disabled. Writes to stderr."""

    def __init__(self, enabled: bool | None, every: float = 10.0):
        self.quiet = enabled is False
        self.tty = not self.quiet and (sys.stderr.isatty() if enabled is None else enabled)
        self.every, self.bar = every, None

    def start(self, name: str, total: int | None, done: int = 0) -> None:
        self.name, self.total, self.done, self.first = name, total, done, done
        self.t0 = self.last = time.perf_counter()
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(TextColumn(f"[bold]{name}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                TimeRemainingColumn(), console=Console(stderr=True))
            self.task = self.bar.add_task(name, total=total, completed=done)
            self.bar.start()

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.advance(self.task, n)
        elif not self.quiet and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            self.note(self._line())

    def _line(self) -> str:
        secs = max(time.perf_counter() - self.t0, 1e-9)
        rate = (self.done - self.first) / secs
        of = f"/{self.total / 1e6:.1f}" if self.total else ""
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {time.strftime('%H:%M:%S', time.gmtime(max(self.total - self.done, 0) / rate))}"
        return f"{self.name}: {self.done / 1e6:.1f}{of} MB, {rate / 1e6:.2f} MB/s{eta}"

    def finish(self) -> float:
        """End the phase; its MB/s."""
        secs = max(time.perf_counter() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        self.total = None
        if not self.quiet and not self.tty:
            self.note(self._line() + f" in {secs:.1f} s")
        return (self.done - self.first) / secs

    def note(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ scan
@dataclass
class _Scan:
    digest: str
    bytes: int
    documents: int
    seen: np.ndarray  # bool per code point (char tokenizers), or empty
    sample: list[str] = field(default_factory=list)
    sample_bytes: int = 0


def _scan(src: sources.Source, progress: _Progress, *, chars: bool, sample_bytes: int) -> _Scan:
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
    return _Scan(hasher.hexdigest(), total, docs, seen, sample, taken)


# ------------------------------------------------------------------------------ shards
class _Shards:
    """Appends ids to the current shard's temporary file; closes shards atomically and records
    each in .progress.json (with the source position after it)."""

    def __init__(self, out: Path, state: dict[str, Any], shard_tokens: int, progress: _Progress):
        self.out, self.state, self.shard_tokens, self.progress = out, state, shard_tokens, progress
        self.dtype = np.dtype(state["dtype"]).newbyteorder("<")
        self.file = None
        self.tokens = self.documents = self.bytes = 0
        self.buffer: list[np.ndarray] = []
        kill = os.environ.get(_KILL_ENV)
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
            os.kill(os.getpid(), signal.SIGKILL)  # the test seam (see _KILL_ENV)

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
        _write_json(self.out / PROGRESS_FILE, self.state)
        self.tokens = self.documents = self.bytes = 0


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _encode(src: sources.Source, shards: _Shards, encode: Callable[[list[str]], list[np.ndarray]],
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


# ------------------------------------------------------------------------------ prepare
def _load_given(tokenizer: Tokenizer | str | os.PathLike) -> Tokenizer:
    return tokenizer if isinstance(tokenizer, Tokenizer) else tk.load_tokenizer(tokenizer)


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir: {str(out)!r} is a file; choose a new directory")
    # A prepare killed before its first .progress.json leaves at most tokenizer.json and temporaries.
    ours = {INDEX_FILE, PROGRESS_FILE, TOKENIZER_FILE}
    if out.is_dir() and not (out / INDEX_FILE).is_file() and not (out / PROGRESS_FILE).is_file() and any(
            p.name not in ours and not p.name.endswith(".tmp") for p in out.iterdir()):
        raise FileExistsError(f"out_dir: {str(out)!r} exists and is not a prepared dataset; choose a new or "
                              "empty directory")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _refuse(out: Path, what: str, recorded: dict[str, Any], settings: dict[str, Any], digest: str) -> None:
    """FileExistsError unless `recorded` (an index or a progress file) is of this source and settings."""
    source = recorded.get("source", {})
    if source.get("sha256") != digest:
        raise FileExistsError(f"out_dir: {str(out)!r} already holds {what} of another source "
                              f"({source.get('spec')!r}); choose a new directory, or delete it to prepare again")
    if recorded.get("prepare", {}).get("settings") != settings:
        raise FileExistsError(f"out_dir: {str(out)!r} already holds {what} of this source with other settings "
                              f"({recorded.get('prepare', {}).get('settings')}); choose a new directory, or "
                              "delete it to prepare again")


def prepare_dataset(source: str | os.PathLike | sources.HFDataset, out_dir: str | os.PathLike, *,
                    tokenizer: Tokenizer | str | os.PathLike | None = None, tokenizer_type: str = "char",
                    bpe_vocab_size: int = 2048, text_field: str = "text",
                    shard_tokens: int = DEFAULT_SHARD_TOKENS, unknown_chars: str = "error",
                    bpe_sample_bytes: int = DEFAULT_BPE_SAMPLE_BYTES, piece_bytes: int = sources.PIECE_BYTES,
                    progress: bool | None = None) -> Path:
    """Prepare `source` into the dataset directory `out_dir` (see the module docstring); return it.

    - source: a text file, a folder or glob of text files, a .jsonl or .parquet file (or a
      folder or glob of them), or a `sources.HFDataset`.
    - tokenizer: None = train one (`tokenizer_type` "char" | "bpe", `bpe_vocab_size`, from a
      `bpe_sample_bytes` sample); or a tokenizer.json path / a Tokenizer.
    - text_field: the JSONL field / Parquet column of the text (HFDataset has its own).
    - unknown_chars: with a given char tokenizer, characters outside its vocabulary: "error"
      (refused before anything is written) or "drop".
    - progress: None = a bar on a terminal, plain lines otherwise; False = silent.
    Raises DataError / TokenizerError for bad input and FileExistsError for an `out_dir` of
    something else, all before anything is written.
    """
    out = Path(out_dir)
    report = _Progress(progress)
    if shard_tokens < 1:
        raise DataError(f"shard_tokens: must be positive, got {shard_tokens}")
    if tokenizer is None and tokenizer_type not in ("char", "bpe"):
        raise tk.TokenizerError(f"tokenizer_type: unknown tokenizer {tokenizer_type!r}; choose char or bpe")
    tk.check_unknown_chars(unknown_chars)
    src = sources.open_source(source, text_field=text_field, exclude=out, piece_bytes=piece_bytes)
    _check_out_dir(out)
    given = _load_given(tokenizer) if tokenizer is not None else None
    char_table = tk.char_table(given) if given is not None else None
    if given is not None:
        settings: dict[str, Any] = {"tokenizer": "given", "tokenizer_sha256": tk.digest(given)}
        if char_table is not None:  # a char vocabulary: unknown characters may be dropped
            settings["unknown_chars"] = unknown_chars
    elif tokenizer_type == "char":
        settings = {"tokenizer": "char"}
    else:
        settings = {"tokenizer": "bpe", "bpe_vocab_size": bpe_vocab_size, "bpe_sample_bytes": bpe_sample_bytes}
    settings |= {"shard_tokens": shard_tokens, "piece_bytes": piece_bytes}

    index = _read_json(out / INDEX_FILE)
    if index is not None and index.get("prepare", {}).get("source_stat") == src.stat \
            and index.get("prepare", {}).get("settings") == settings:
        report.note(f"already prepared: {out} ({index['total_tokens']} tokens), unchanged source")
        return out

    scan = _scan(src, report, chars=(given is None and tokenizer_type == "char") or char_table is not None,
                 sample_bytes=bpe_sample_bytes if given is None and tokenizer_type == "bpe" else 0)
    if index is not None:
        _refuse(out, "a prepared dataset", index, settings, scan.digest)
        report.note(f"already prepared: {out} ({index['total_tokens']} tokens), the same source")
        return out
    state = _read_json(out / PROGRESS_FILE)
    if state is not None:
        _refuse(out, "an unfinished prepare", state, settings, scan.digest)
    if char_table is not None:
        unknown = np.flatnonzero(scan.seen & (char_table < 0))
        if len(unknown) and unknown_chars == "error":
            chars = [chr(c) for c in unknown[:5]]
            raise tk.TokenizerError(f"source: {src.spec!r} holds {len(unknown)} character(s) outside the char "
                                    f"vocabulary of the given tokenizer, e.g. {chars!r}; set unknown_chars: drop "
                                    "to leave them out, or use another tokenizer")

    # ---- every input check has passed: from here on, files are written.
    out.mkdir(parents=True, exist_ok=True)
    if state is not None:  # resume: the recorded tokenizer, never a retrained one
        tok = tk.load_tokenizer(out / TOKENIZER_FILE)
        if tk.digest(tok) != state["tokenizer_sha256"]:
            raise DataError(f"out_dir: {str(out / TOKENIZER_FILE)!r} changed since the prepare began; delete "
                            f"{str(out)!r} and prepare again")
        report.note(f"resuming {out}: {len(state['shards'])} shard(s) done")
    else:
        if given is not None:
            tok = given
        elif tokenizer_type == "char":
            tok = tk.char_tokenizer("".join(map(chr, np.flatnonzero(scan.seen))))
        else:
            report.note(f"training BPE ({bpe_vocab_size} tokens) on {scan.sample_bytes / 1e6:.1f} MB "
                        f"of the source")
            tok = tk.train_bpe(scan.sample, bpe_vocab_size)
        tk.save_tokenizer(tok, out / TOKENIZER_FILE)
        vocab = tok.get_vocab_size()
        state = {"format": FORMAT, "version": VERSION,
                 "dtype": dtype_name(vocab),
                 "vocab_size": vocab, "eot_id": tk.eot_id(tok), "tokenizer_sha256": tk.digest(tok),
                 "source": {"kind": src.kind, "spec": src.spec, "text_field": src.text_field,
                            "sha256": scan.digest},
                 "prepare": {"settings": settings}, "shards": [], "position": None}
        _write_json(out / PROGRESS_FILE, state)
    scan.sample.clear()
    if state["eot_id"] is None:
        report.note("the tokenizer has no end-of-text token: documents are joined without a separator")

    for stale in out.iterdir():  # a killed prepare's partial shard, and shards past the resume point
        if stale.name.endswith(".tmp") or (stale.name.startswith("shard_") and stale.name not in
                                           {s["file"] for s in state["shards"]}):
            stale.unlink()
    shards = _Shards(out, state, shard_tokens, report)
    done = sum(s["bytes"] for s in state["shards"])
    report.start("encode", scan.bytes, done)
    position = tuple(state["position"]) if state["position"] is not None else None
    if position is not None or not state["shards"]:
        _encode(src, shards, tk.batch_encoder(tok, unknown_chars), state["eot_id"], position)
    shards.close(None)
    report.finish()

    if sum(s["bytes"] for s in state["shards"]) != scan.bytes:
        raise DataError(f"source: {src.spec!r} changed while it was being prepared; delete {str(out)!r} and "
                        "prepare again")
    total = {"total_tokens": sum(s["tokens"] for s in state["shards"]),
             "total_documents": sum(s["documents"] for s in state["shards"]),
             "total_bytes": sum(s["bytes"] for s in state["shards"])}
    index = {k: v for k, v in state.items() if k not in ("position", "prepare")} | total
    index["prepare"] = {"settings": settings, "source_stat": src.stat}
    _write_json(out / INDEX_FILE, index)
    (out / PROGRESS_FILE).unlink()
    return out
