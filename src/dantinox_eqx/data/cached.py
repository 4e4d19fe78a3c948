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
from typing import Any

from tokenizers import Tokenizer

from ..config import Config
from . import tokenizer as tk
from .prepare import DEFAULT_BPE_SAMPLE_BYTES, PROGRESS_FILE, is_prepared, prepare_dataset, read_index
from .sampling import DataError
from .sources import _MAGIC, HFDataset, open_source

__all__ = ["RAW_TEXT_BYTES", "needs_prepare", "prepared_source"]

RAW_TEXT_BYTES = 64 << 20  # a text file up to this size is encoded whole (sampling.encode_corpus)


def _is_glob(spec: str) -> bool:
    return any(c in _MAGIC for c in spec)


def needs_prepare(path: str | os.PathLike | HFDataset) -> bool:
    """Whether `train --data_path path` goes through `prepared_source` (module docstring): not
    a prepared dataset, not a text file of at most RAW_TEXT_BYTES, not a missing path."""
    if isinstance(path, HFDataset):
        return True
    p = Path(path).expanduser()
    if p.is_dir():
        # a prepared dataset, finished or being written by `prepare` (whose error says to finish it)
        return not (is_prepared(p) or (p / PROGRESS_FILE).is_file())
    if p.is_file():
        return p.name.lower().endswith((".jsonl", ".parquet")) or p.stat().st_size > RAW_TEXT_BYTES
    return _is_glob(os.fspath(path))  # a missing path: the caller's error


def prepared_source(source: str | os.PathLike | HFDataset, cache_root: str | os.PathLike, config: Config,
                    tokenizer: Tokenizer | None = None, progress: bool | None = None) -> Path:
    """The prepared dataset of `source` in `cache_root/prepared` (prepared now if needed; see
    the module docstring), with `config`'s tokenizer_type, bpe_vocab_size, dataset_text_field and
    unknown_chars, or the fixed `tokenizer`. DataError naming `data_path` for a source `prepare`
    refuses, before anything is written."""
    options = dict(tokenizer=tokenizer, tokenizer_type=config.tokenizer_type, bpe_vocab_size=config.bpe_vocab_size,
                   text_field=config.dataset_text_field, unknown_chars=config.unknown_chars, progress=progress)
    try:
        return _prepared(source, Path(cache_root), options)
    except DataError as e:  # prepare names its input "source"; here it is train's data_path
        message = str(e)
        if message.startswith("source:"):
            raise DataError("data_path:" + message[len("source:"):]) from None
        raise


def _prepared(source: str | os.PathLike | HFDataset, cache_root: Path, options: dict[str, Any]) -> Path:
    text_field = options["text_field"]
    if isinstance(source, HFDataset):
        spec, name = json.dumps([source.name, source.config, source.split, source.text_field]), source.name
    else:
        open_source(source, text_field=text_field)  # a missing path, an empty folder, ...: refused here
        spec = str(Path(source).expanduser().absolute())
        name = "glob" if _is_glob(spec) else Path(spec).name
    key = hashlib.sha256(json.dumps([spec, text_field]).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    folder = cache_root / "prepared" / f"{safe}.{key}"
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = folder.with_name(folder.name + ".lock")
    try:
        return _prepared_locked(source, folder, lock_file, options)
    except (DataError, tk.TokenizerError):  # bad input (prepare wrote nothing): leave no trace in the cache
        if not any(folder.iterdir()):
            folder.rmdir()
            lock_file.unlink(missing_ok=True)
            if not any(folder.parent.iterdir()):  # prepared/ itself, when it was this source's
                folder.parent.rmdir()
        raise


def _prepared_locked(source: str | os.PathLike | HFDataset, folder: Path, lock_file: Path,
                     options: dict[str, Any]) -> Path:
    with open(lock_file, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        tokenizer = options["tokenizer"]
        if tokenizer is not None:
            digest = tk.digest(tokenizer)
            for done in sorted(folder.iterdir()):  # this source prepared with this tokenizer already?
                if not is_prepared(done):
                    continue
                index = read_index(done)
                if index.get("tokenizer_sha256") == digest:
                    # checked (and kept) with the settings it was prepared with: a tokenizer it
                    # trained itself is not "given" to it (other settings would prepare it again)
                    recorded = index.get("prepare", {}).get("settings", {})
                    if recorded.get("tokenizer") in ("char", "bpe"):
                        options = {**options, "tokenizer": None, "tokenizer_type": recorded["tokenizer"],
                                   "bpe_vocab_size": recorded.get("bpe_vocab_size", options["bpe_vocab_size"])}
                    return _prepare(source, done, options)
            out = folder / f"given-{digest[:16]}"
        elif options["tokenizer_type"] == "bpe":
            out = folder / f"bpe-{options['bpe_vocab_size']}-{DEFAULT_BPE_SAMPLE_BYTES}"
        else:
            out = folder / options["tokenizer_type"]
        return _prepare(source, out, options)


def _prepare(source: str | os.PathLike | HFDataset, out: Path, options: dict[str, Any]) -> Path:
    """`prepare_dataset` into `out` (a no-op when it is prepared and the source unchanged); a
    source that changed since (prepare refuses to mix two sources in one folder) is prepared
    again from scratch: the cache is ours to replace."""
    try:
        return prepare_dataset(source, out, **options)
    except FileExistsError:
        shutil.rmtree(out)
        return prepare_dataset(source, out, **options)
