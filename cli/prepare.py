"""`dantinox-eqx prepare [SOURCE] OUT_DIR`: a source -> a prepared dataset of token shards
(`dantinox_eqx.prepare.prepare_dataset`)."""

from __future__ import annotations

import dataclasses
import json
from importlib.resources import files
from pathlib import Path

import click

from dantinox_eqx.config import Config

from .common import fail, handle_errors
from .overrides import field_options, load_config

# The config fields prepare reads; every other field belongs to training.
_FIELDS = ("tokenizer_type", "tokenizer_path", "bpe_vocab_size", "unknown_chars", "dataset_source", "dataset_name",
           "dataset_config", "dataset_split", "dataset_text_field", "streaming", "chat_template", "train_on")


@click.command("prepare", context_settings={"max_content_width": 120})
@click.argument("paths", nargs=-1, metavar="[SOURCE] OUT_DIR")
@click.option("--config", "config_path", type=str, default=None, metavar="YAML",
              help="Config file whose tokenizer and dataset_* fields apply. Default: the packaged default config.")
@click.option("--text_field", type=str, default=None, metavar="NAME",
              help="JSONL field / Parquet column / HF field of the text. Default: dataset_text_field ('text').")
@click.option("--shard_tokens", type=click.IntRange(min=1), default=None, metavar="N",
              help="Tokens per shard (cut at the next document end). Default: 2**27.")
@click.option("--bpe_sample_mb", type=click.FloatRange(min=0.001), default=None, metavar="MB",
              help="MB of text, spread over the source, that BPE is trained on. Default: 64.")
@field_options(exclude=[f.name for f in dataclasses.fields(Config) if f.name not in _FIELDS])
@handle_errors
def prepare(paths: tuple[str, ...], config_path: str | None, text_field: str | None, shard_tokens: int | None,
            bpe_sample_mb: float | None, **overrides: str | None) -> None:
    """Turn SOURCE into a prepared dataset in OUT_DIR: memory-mapped token shards, index.json and
    tokenizer.json, streamed with bounded memory; a killed prepare resumes when run again.

    \b
    SOURCE: a UTF-8 text file (one document), a folder or quoted glob of text files (one document
    per file), a .jsonl file (one document per line, its "text" field) or a .parquet file (its
    "text" column), or a folder or glob of those. With --dataset_source hf: a Hugging Face dataset
    name (default: dataset_name), read with the datasets package (pip install 'dantinox-eqx[hf-data]').

    \b
    dantinox-eqx prepare corpus.txt data/corpus                      char vocabulary
    dantinox-eqx prepare 'texts/*.md' data/md --tokenizer_type bpe --bpe_vocab_size 8192
    dantinox-eqx prepare docs.jsonl data/docs --text_field content --tokenizer_path gpt2/tokenizer.json
    dantinox-eqx prepare --dataset_source hf roneneldan/TinyStories data/tiny --streaming True

    Exit codes: 0 done (or already prepared), 2 bad input (nothing written).
    """
    from dantinox_eqx.data.prepare import DEFAULT_BPE_SAMPLE_BYTES, DEFAULT_SHARD_TOKENS, prepare_dataset, read_index
    from dantinox_eqx.data.sources import HFDataset

    default = Path(str(files("dantinox_eqx") / "configs" / "default_config.yaml"))
    config = load_config(config_path, overrides, default=default)
    hf = config.dataset_source == "hf"
    if len(paths) == 2:
        source, out_dir = paths
    elif len(paths) == 1 and hf:
        source, out_dir = None, paths[0]
    else:
        fail("prepare: give SOURCE and OUT_DIR (with --dataset_source hf, SOURCE defaults to dataset_name)")
    field = text_field if text_field is not None else config.dataset_text_field
    if source is not None and _prepare_chat(source, out_dir, config):
        return
    if hf:
        source = HFDataset.from_config(config.replace(dataset_text_field=field), source)
    out = prepare_dataset(source, out_dir, tokenizer=config.tokenizer_path or None,
                          tokenizer_type=config.tokenizer_type, bpe_vocab_size=config.bpe_vocab_size,
                          text_field=field, unknown_chars=config.unknown_chars,
                          shard_tokens=shard_tokens or DEFAULT_SHARD_TOKENS,
                          bpe_sample_bytes=int(bpe_sample_mb * 1e6) if bpe_sample_mb else DEFAULT_BPE_SAMPLE_BYTES)
    index = read_index(out)
    click.echo(f"prepared {out}: {index['total_tokens']} tokens ({index['dtype']}, vocab {index['vocab_size']}) "
               f"from {index['total_documents']} documents, {index['total_bytes'] / 1e6:.1f} MB of text, "
               f"{len(index['shards'])} shard(s)")


def _prepare_chat(source: str, out_dir: str, config: Config) -> bool:
    """Chat JSONL (issue 23): prepared with its loss-mask stream (data/chat_prepare.py); False
    for any other source."""
    from dantinox_eqx.data import tokenizer as tk
    from dantinox_eqx.data.chat_prepare import is_chat_jsonl, prepare_chat

    if not is_chat_jsonl(source):
        return False
    if not config.tokenizer_path:
        fail("tokenizer_path: chat data is tokenized with the model's tokenizer: pass --tokenizer_path "
             "RUN_DIR/tokenizer.json")
    template = None
    if config.chat_template:
        if not Path(config.chat_template).is_file():
            fail(f"chat_template: {config.chat_template!r} is not a file; pass a Jinja chat template file")
        template = Path(config.chat_template).read_text(encoding="utf-8")
    if Path(out_dir).exists() and any(Path(out_dir).iterdir()) and not (Path(out_dir) / "index.json").is_file():
        fail(f"OUT_DIR: {out_dir!r} exists and is not a prepared dataset; pass a new folder")
    out = prepare_chat(source, out_dir, tk.load_tokenizer(config.tokenizer_path), template, config.train_on,
                       field="source")
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    click.echo(f"prepared {out}: {index['total_tokens']} tokens from {index['chat']['examples']} chat examples, "
               f"{index['chat']['trained_tokens']} trained (train_on {index['chat']['train_on']})")
    return True


COMMANDS = [prepare]
