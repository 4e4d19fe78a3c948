"""Raw sources prepared on first use, so that `train --data_path` takes any source `prepare`
takes: a folder or glob of files, a .jsonl or .parquet file, a text file over `RAW_TEXT_BYTES`,
or (dataset_source: hf) a Hugging Face dataset becomes a prepared dataset in the user's cache
(`prepare.prepare_dataset`: streamed, bounded memory, resumable), reused while the source is
unchanged (prepare's own check of the files' names, sizes and mtimes) and prepared again when
it changed. Smaller text files keep the simpler path of `sampling.encode_corpus` (their ids in
one cached array, the ids round 1 gave them: existing runs resume exactly).

    <cache>/prepared/<source name>.<16 hex: source spec + text field>/<tokenizer>/
        index.json, tokenizer.json, shard_*.bin     (the prepared-dataset format, prepare.py)

<tokenizer> is `char`, `bpe-<vocab>-<sample bytes>` or, for a fixed tokenizer (a resumed run's,
`tokenizer_path`, a fine-tune's base run's), `given-<16 hex of its digest>`; a fixed tokenizer
first reuses a dataset of the source prepared with that very tokenizer (a resumed run finds the
one its first start prepared). A file lock beside each source's folder serialises processes
preparing the same source (two runs started together prepare it once).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from . import tokenizer as tk
from .prepare import DEFAULT_BPE_SAMPLE_BYTES, INDEX_FILE, is_prepared, prepare_dataset
from .sampling import DataError
from .sources import HFDataset, open_source

__all__ = ["RAW_TEXT_BYTES", "needs_prepare", "prepared_source"]

RAW_TEXT_BYTES = 64 << 20  # a text file up to this size is encoded whole (sampling.encode_corpus)
_MAGIC = "*?["


def needs_prepare(path: str | os.PathLike | HFDataset) -> bool:
    """Whether `train --data_path path` goes through `prepared_source` (module docstring): not
    a prepared dataset, not a text file of at most RAW_TEXT_BYTES, not a missing path."""
    if isinstance(path, HFDataset):
        return True
    p = Path(path).expanduser()
    if p.is_dir():
        # a prepared dataset, finished or being written by `prepare` (whose error says to finish it)
        return not (is_prepared(p) or (p / ".progress.json").is_file())
    if p.is_file():
        return p.name.lower().endswith((".jsonl", ".parquet")) or p.stat().st_size > RAW_TEXT_BYTES
    return any(c in os.fspath(path) for c in _MAGIC)  # a glob (a missing path: the caller's error)


def prepared_source(source: str | os.PathLike | HFDataset, cache_root: str | os.PathLike, *,
                    tokenizer: Tokenizer | None = None, tokenizer_type: str = "char", bpe_vocab_size: int = 2048,
                    text_field: str = "text", unknown_chars: str = "error", progress: bool | None = None) -> Path:
    """The prepared dataset of `source` in `cache_root/prepared` (prepared now if needed; see
    the module docstring). DataError naming `data_path` for a source `prepare` refuses, before
    anything is written."""
    try:
        return _prepared(source, Path(cache_root), tokenizer, tokenizer_type, bpe_vocab_size, text_field,
                         unknown_chars, progress)
    except DataError as e:  # prepare names its input "source"; here it is train's data_path
        message = str(e)
        if message.startswith("source:"):
            raise DataError("data_path:" + message[len("source:"):]) from None
        raise


def _prepared(source: str | os.PathLike | HFDataset, cache_root: Path, tokenizer: Tokenizer | None,
              tokenizer_type: str, bpe_vocab_size: int, text_field: str, unknown_chars: str,
              progress: bool | None) -> Path:
    if isinstance(source, HFDataset):
        spec, name = json.dumps([source.name, source.config, source.split, source.text_field]), source.name
    else:
        open_source(source, text_field=text_field)  # a missing path, an empty folder, ...: refused here
        spec = str(Path(source).expanduser().absolute())
        name = Path(spec).name if not any(c in spec for c in _MAGIC) else "glob"
    key = hashlib.sha256(json.dumps([spec, text_field]).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    folder = cache_root / "prepared" / f"{safe}.{key}"
    options = dict(tokenizer=tokenizer, tokenizer_type=tokenizer_type, bpe_vocab_size=bpe_vocab_size,
                   text_field=text_field, unknown_chars=unknown_chars, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = folder.with_name(folder.name + ".lock")
    try:
        return _prepared_locked(source, folder, lock_file, tokenizer, tokenizer_type, bpe_vocab_size, options)
    except (DataError, tk.TokenizerError):  # bad input (prepare wrote nothing): leave no trace in the cache
        if not any(folder.iterdir()):
            folder.rmdir()
            lock_file.unlink(missing_ok=True)
            if not any(folder.parent.iterdir()):  # prepared/ itself, when it was this source's
                folder.parent.rmdir()
        raise


def _prepared_locked(source: str | os.PathLike | HFDataset, folder: Path, lock_file: Path,
                     tokenizer: Tokenizer | None, tokenizer_type: str, bpe_vocab_size: int, options: dict) -> Path:
    with open(lock_file, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        if tokenizer is not None:
            digest = tk.digest(tokenizer)
            for done in sorted(folder.iterdir()):  # this source prepared with this tokenizer already?
                index = _index(done)
                if is_prepared(done) and index.get("tokenizer_sha256") == digest:
                    # checked (and kept) with the settings it was prepared with: a tokenizer it
                    # trained itself is not "given" to it (other settings would prepare it again)
                    recorded = index.get("prepare", {}).get("settings", {})
                    if recorded.get("tokenizer") in ("char", "bpe"):
                        options = {**options, "tokenizer": None, "tokenizer_type": recorded["tokenizer"],
                                   "bpe_vocab_size": recorded.get("bpe_vocab_size", bpe_vocab_size)}
                    return _prepare(source, done, options)
            out = folder / f"given-{digest[:16]}"
        elif tokenizer_type == "bpe":
            out = folder / f"bpe-{bpe_vocab_size}-{DEFAULT_BPE_SAMPLE_BYTES}"
        else:
            out = folder / tokenizer_type
        return _prepare(source, out, options)


def _index(path: Path) -> dict:
    try:
        return json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _prepare(source: str | os.PathLike | HFDataset, out: Path, options: dict) -> Path:
    """`prepare_dataset` into `out` (a no-op when it is prepared and the source unchanged); a
    source that changed since (prepare refuses to mix two sources in one folder) is prepared
    again from scratch: the cache is ours to replace."""
    try:
        return prepare_dataset(source, out, **options)
    except FileExistsError:
        shutil.rmtree(out)
        return prepare_dataset(source, out, **options)
