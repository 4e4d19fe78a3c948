"""A source (text, folder, glob, JSONL, Parquet, Hugging Face) -> a prepared dataset directory of
token shards, streamed with bounded memory, atomic per shard and resumable.

    prepare_dataset("corpus/", "data/corpus.tokens", tokenizer_type="bpe", bpe_vocab_size=8192)

The directory's format (file names, index.json): data/index.py. The passes below live in
data/prepare_scan.py and data/prepare_shards.py, the progress report in data/prepare_progress.py;
this module checks the inputs and the output folder and runs the steps in order.

How it runs, in two passes over the source (`sources.py` streams it in pieces of <= 64 KiB):
1. scan: validates everything (binary files, malformed JSONL lines, missing fields or
   columns; nothing is written before it passed), computes the source's digest, counts its
   bytes (for the progress bar's ETA), collects the characters (char tokenizers) and the BPE
   training sample: about `bpe_sample_bytes` (default 64 MB) of text spread evenly over the
   source (each piece is taken when the running share `bpe_sample_bytes / source size` of the
   bytes read so far covers it; a source of unknown size, a streamed HF dataset, gives its
   first `bpe_sample_bytes`). The trainer reads that sample one piece at a time.
2. encode: pieces are encoded in batches of about `prepare_shards.BATCH_BYTES` of text (the `tokenizers`
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

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from . import sources
from . import tokenizer as tk
from .index import FORMAT, INDEX_FILE, PROGRESS_FILE, TOKENIZER_FILE, VERSION, dtype_name, is_prepared, read_index
from .prepare_progress import PrepareProgress
from .prepare_scan import Scan, scan_source
from .prepare_shards import ShardWriter, encode_source, write_json
from .sampling import DataError

__all__ = ["FORMAT", "INDEX_FILE", "TOKENIZER_FILE", "DEFAULT_SHARD_TOKENS", "DEFAULT_BPE_SAMPLE_BYTES",
           "prepare_dataset", "read_index", "is_prepared"]

DEFAULT_SHARD_TOKENS = 2 ** 27
DEFAULT_BPE_SAMPLE_BYTES = 64_000_000


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
    report = PrepareProgress(progress)
    _check_arguments(shard_tokens, tokenizer, tokenizer_type, unknown_chars)
    src = sources.open_source(source, text_field=text_field, exclude=out, piece_bytes=piece_bytes)
    _check_out_dir(out)
    given = _load_given(tokenizer) if tokenizer is not None else None
    char_table = tk.char_table(given) if given is not None else None
    settings = _settings(given, char_table, tokenizer_type, unknown_chars, bpe_vocab_size, bpe_sample_bytes) | {
        "shard_tokens": shard_tokens, "piece_bytes": piece_bytes}

    index = _read_json(out / INDEX_FILE)
    if index is not None and index.get("prepare", {}).get("source_stat") == src.stat \
            and index.get("prepare", {}).get("settings") == settings:
        report.note(f"already prepared: {out} ({index['total_tokens']} tokens), unchanged source")
        return out
    scan = scan_source(src, report, chars=(given is None and tokenizer_type == "char") or char_table is not None,
                       sample_bytes=bpe_sample_bytes if given is None and tokenizer_type == "bpe" else 0)
    if index is not None:
        _refuse(out, "a prepared dataset", index, settings, scan.digest)
        report.note(f"already prepared: {out} ({index['total_tokens']} tokens), the same source")
        return out
    state = _read_json(out / PROGRESS_FILE)
    if state is not None:
        _refuse(out, "an unfinished prepare", state, settings, scan.digest)
    if char_table is not None:
        _check_known_chars(src, scan, char_table, unknown_chars)

    # ---- every input check has passed: from here on, files are written.
    out.mkdir(parents=True, exist_ok=True)
    if state is not None:
        tok = _resumed_tokenizer(out, state, report)
    else:
        tok = given if given is not None else _train_tokenizer(scan, tokenizer_type, bpe_vocab_size, report)
        state = _begin(out, tok, src, scan, settings)
    scan.sample.clear()
    if state["eot_id"] is None:
        report.note("the tokenizer has no end-of-text token: documents are joined without a separator")
    _encode(out, src, state, tok, scan.bytes, shard_tokens, unknown_chars, report)
    _finish(out, src, state, settings, scan.bytes)
    return out


# ------------------------------------------------------------------------------ input checks
def _check_arguments(shard_tokens: int, tokenizer: Any, tokenizer_type: str, unknown_chars: str) -> None:
    if shard_tokens < 1:
        raise DataError(f"shard_tokens: must be positive, got {shard_tokens}")
    if tokenizer is None and tokenizer_type not in ("char", "bpe"):
        raise tk.TokenizerError(f"tokenizer_type: unknown tokenizer {tokenizer_type!r}; choose char or bpe")
    tk.check_unknown_chars(unknown_chars)


def _settings(given: Tokenizer | None, char_table: np.ndarray | None, tokenizer_type: str, unknown_chars: str,
              bpe_vocab_size: int, bpe_sample_bytes: int) -> dict[str, Any]:
    """The tokenizer settings a prepared dataset records (a resume or a re-run must match them)."""
    if given is not None:
        settings: dict[str, Any] = {"tokenizer": "given", "tokenizer_sha256": tk.digest(given)}
        if char_table is not None:  # a char vocabulary: unknown characters may be dropped
            settings["unknown_chars"] = unknown_chars
        return settings
    if tokenizer_type == "char":
        return {"tokenizer": "char"}
    return {"tokenizer": "bpe", "bpe_vocab_size": bpe_vocab_size, "bpe_sample_bytes": bpe_sample_bytes}


def _check_known_chars(src: sources.Source, scan: Scan, char_table: np.ndarray, unknown_chars: str) -> None:
    """A given char tokenizer must know every character of the source (unless they are dropped)."""
    unknown = np.flatnonzero(scan.seen & (char_table < 0))
    if len(unknown) and unknown_chars == "error":
        chars = [chr(c) for c in unknown[:5]]
        raise tk.TokenizerError(f"source: {src.spec!r} holds {len(unknown)} character(s) outside the char "
                                f"vocabulary of the given tokenizer, e.g. {chars!r}; set unknown_chars: drop "
                                "to leave them out, or use another tokenizer")


# ------------------------------------------------------------------------------ writing
def _resumed_tokenizer(out: Path, state: dict[str, Any], report: PrepareProgress) -> Tokenizer:
    """A resume's tokenizer: the recorded one, never a retrained one."""
    tok = tk.load_tokenizer(out / TOKENIZER_FILE)
    if tk.digest(tok) != state["tokenizer_sha256"]:
        raise DataError(f"out_dir: {str(out / TOKENIZER_FILE)!r} changed since the prepare began; delete "
                        f"{str(out)!r} and prepare again")
    report.note(f"resuming {out}: {len(state['shards'])} shard(s) done")
    return tok


def _train_tokenizer(scan: Scan, tokenizer_type: str, bpe_vocab_size: int, report: PrepareProgress) -> Tokenizer:
    if tokenizer_type == "char":
        return tk.char_tokenizer("".join(map(chr, np.flatnonzero(scan.seen))))
    report.note(f"training BPE ({bpe_vocab_size} tokens) on {scan.sample_bytes / 1e6:.1f} MB of the source")
    return tk.train_bpe(scan.sample, bpe_vocab_size)


def _begin(out: Path, tok: Tokenizer, src: sources.Source, scan: Scan, settings: dict[str, Any]) -> dict[str, Any]:
    """Write tokenizer.json and the first .progress.json (no shard yet); returns that state."""
    tk.save_tokenizer(tok, out / TOKENIZER_FILE)
    vocab = tok.get_vocab_size()
    state = {"format": FORMAT, "version": VERSION, "dtype": dtype_name(vocab),
             "vocab_size": vocab, "eot_id": tk.eot_id(tok), "tokenizer_sha256": tk.digest(tok),
             "source": {"kind": src.kind, "spec": src.spec, "text_field": src.text_field, "sha256": scan.digest},
             "prepare": {"settings": settings}, "shards": [], "position": None}
    write_json(out / PROGRESS_FILE, state)
    return state


def _encode(out: Path, src: sources.Source, state: dict[str, Any], tok: Tokenizer, total_bytes: int,
            shard_tokens: int, unknown_chars: str, report: PrepareProgress) -> None:
    """Encode the source from the state's resume point into shards (pass 2)."""
    for stale in out.iterdir():  # a killed prepare's partial shard, and shards past the resume point
        if stale.name.endswith(".tmp") or (stale.name.startswith("shard_") and stale.name not in
                                           {s["file"] for s in state["shards"]}):
            stale.unlink()
    shards = ShardWriter(out, state, shard_tokens, report)
    report.start("encode", total_bytes, sum(s["bytes"] for s in state["shards"]))
    position = tuple(state["position"]) if state["position"] is not None else None
    if position is not None or not state["shards"]:
        encode_source(src, shards, tk.batch_encoder(tok, unknown_chars), state["eot_id"], position)
    shards.close(None)
    report.finish()


def _finish(out: Path, src: sources.Source, state: dict[str, Any], settings: dict[str, Any],
            total_bytes: int) -> None:
    """Write index.json (the dataset exists from then on) and drop .progress.json."""
    if sum(s["bytes"] for s in state["shards"]) != total_bytes:
        raise DataError(f"source: {src.spec!r} changed while it was being prepared; delete {str(out)!r} and "
                        "prepare again")
    total = {"total_tokens": sum(s["tokens"] for s in state["shards"]),
             "total_documents": sum(s["documents"] for s in state["shards"]),
             "total_bytes": sum(s["bytes"] for s in state["shards"])}
    index = {k: v for k, v in state.items() if k not in ("position", "prepare")} | total
    index["prepare"] = {"settings": settings, "source_stat": src.stat}
    write_json(out / INDEX_FILE, index)
    (out / PROGRESS_FILE).unlink()
