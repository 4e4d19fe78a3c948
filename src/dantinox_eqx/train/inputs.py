"""What a `fit` trains: its tokenizer and data, and its initial model (fresh, a fine-tune's
base, or a given model; with LoRA adapters when `use_lora`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

from ..config import Config, ConfigError
from ..data import tokenizer as tk
from ..data.cached import prepared_source
from ..data.chat import compile_template
from ..data.corpus import cache_dir, default_corpus_path
from ..data.sampling import DataError
from ..data.sources import HFDataset
from ..data.tokens import Splits, open_splits
from ..lora import has_lora, lora_trainable
from ..model import Transformer, with_max_context
from ..run import finetune
from ..run.chat_template import read_chat_template, read_template_file
from ..run.layout import TOKENIZER_FILE, read_cursor

__all__ = ["training_data", "chat_template", "chat_template_text", "resolve_vocab", "absolute_paths", "initial_model",
           "trainable_mask"]


def training_data(config: Config, data_path: str | os.PathLike | None, run_dir: Path | None,
                  resume: bool) -> tuple[Path, Splits]:
    """(the data path, its train/val `Splits`). `data_path`: a UTF-8 text file, a prepared
    dataset directory (data/tokens.py) or any source `prepare` takes (prepared into the cache on
    first use: data/cached.py); None = on resume the data recorded in the cursor, else with
    dataset_source hf the dataset_* fields' Hugging Face dataset (prepared into the cache), else
    the default corpus. The tokenizer is the run's own on resume, then `tokenizer_path`, then a
    fine-tune's base run's (a prepared dataset must have been made with it), else the prepared
    dataset's or one trained on the text."""
    if data_path is None and resume:
        recorded = read_cursor(run_dir).get("data_path")
        if recorded and Path(recorded).exists():  # a text file or a prepared directory
            data_path = recorded
    hf = data_path is None and config.dataset_source == "hf"  # DantinoX's dataset_* fields
    path = Path(data_path) if data_path is not None else None if hf else default_corpus_path()
    tokenizer_file = None  # the file of a fixed tokenizer, named when a prepared dataset differs
    if resume and (run_dir / TOKENIZER_FILE).is_file():  # absent: stopped before saving it
        tokenizer_file = run_dir / TOKENIZER_FILE
    elif config.tokenizer_path:
        tokenizer_file = Path(config.tokenizer_path)
    elif config.init_from:  # a fine-tune keeps its base's tokenizer (never retrained)
        tokenizer_file = finetune.base_dir(config.init_from) / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise ConfigError(f"init_from: {str(config.init_from)!r} has no {TOKENIZER_FILE}; pass the "
                              "directory of a finished `dantinox-eqx train` run")
    elif config.use_lora:
        raise ConfigError("use_lora: a LoRA fine-tune keeps its base model's tokenizer: set init_from to the "
                          "base run directory (CLI: --init_from RUN_DIR), or with model= set tokenizer_path "
                          "to the model's tokenizer.json")
    tokenizer = tk.load_tokenizer(tokenizer_file) if tokenizer_file is not None else None
    if hf:  # prepared into the cache (data/cached.py); that folder is the run's data_path
        path = prepared_source(HFDataset.from_config(config), cache_dir(), config, tokenizer)
    try:
        dataset = open_splits(path, config, tokenizer, None if tokenizer_file is None else repr(str(tokenizer_file)),
                              cache_dir=cache_dir(), chat_template=chat_template(config, run_dir, resume))
    except DataError as e:
        if tokenizer is None or "outside the char vocabulary" not in str(e):
            raise
        source = ("the run" if resume else "tokenizer_path" if config.tokenizer_path
                  else f"the base run {str(config.init_from)!r}")
        raise DataError(f"{e}; the tokenizer comes from {source} and a char vocabulary cannot grow: "
                        "remove those characters from the corpus, or set unknown_chars: drop") from None
    return path, dataset


def chat_template(config: Config, run_dir: Path | None, resume: bool) -> str | None:
    """The chat template that renders chat data: the file `chat_template` names (checked: it
    must compile; ChatTemplateError names the file), else a resumed run's own, else a
    fine-tune's base run's (chat_template.jinja), else None."""
    if config.chat_template:
        text = read_template_file(config.chat_template)
        compile_template(text, f"chat_template: {config.chat_template}")
        return text
    for folder in ([run_dir] if resume and run_dir is not None else []) + (
            [finetune.base_dir(config.init_from)] if config.init_from else []):
        found = read_chat_template(folder)
        if found is not None:
            return found
    return None


def resolve_vocab(config: Config, vocab: int) -> Config:
    """`config` with vocab_size taken from the tokenizer (ConfigError if a set one is too small)."""
    if config.vocab_size is None:
        return config.replace(vocab_size=vocab)
    if config.vocab_size < vocab:
        raise ConfigError(f"vocab_size: {config.vocab_size} is smaller than the tokenizer's {vocab} "
                          "tokens; leave vocab_size unset (null) to take it from the tokenizer")
    return config


def absolute_paths(config: Config) -> Config:
    """`config` with init_from, val_path and chat_template made absolute: recorded so in the run's
    config.yaml, resume and loading work from any directory (`fit` and a population's members)."""
    for name in ("init_from", "val_path", "chat_template"):
        if getattr(config, name):
            config = config.replace(**{name: str(Path(getattr(config, name)).expanduser().resolve())})
    return config


def initial_model(config: Config, key: Any, given: Transformer | None = None
                  ) -> tuple[Transformer, dict[str, Any] | None]:
    """(the model to train, the base pointer of an adapter-only LoRA run or None).

    The model is `given` if any, else the best weights of the run `config.init_from`
    (fine-tuning), else a fresh `Transformer(config)`; with `use_lora`, LoRA adapters are added.
    A LoRA run with a base run (init_from) saves only its adapters plus the pointer
    (lora_base.json, run/finetune.py)."""
    base = None
    if given is not None:
        if given.vocab_size != config.vocab_size:
            raise ConfigError(f"vocab_size: the given model has vocab_size={given.vocab_size}, "
                              f"the tokenizer needs {config.vocab_size}")
        model = given
        if has_lora(model) and not config.use_lora:
            raise ConfigError("use_lora: the given model has LoRA adapters but use_lora is false; pass "
                              "lora.merge_lora(model) to train all its weights")
        if config.use_lora and config.init_from:
            base = finetune.pointer_of(model, config.init_from, config)
        model = with_max_context(model, config.max_context)  # the window this run trains on
    elif config.init_from:
        model, pointer = finetune.load_base(config.init_from, config)
        base = pointer if config.use_lora else None
    elif config.use_lora:
        raise ConfigError("use_lora: LoRA fine-tunes a trained model: set init_from to its run directory "
                          "(CLI: --init_from RUN_DIR), or pass model= to Trainer")
    else:
        model = Transformer.build(config, key=key)  # one compiled program (seconds to the first step)
    if config.use_lora:
        model = finetune.add_adapters(model, config, jax.random.fold_in(key, 1))
    return model, base


def trainable_mask(model: Transformer) -> Any:
    """A bool pytree like the params marking what trains; None = everything. A model with
    LoRA adapters trains only its adapters."""
    return lora_trainable(model) if has_lora(model) else None


def chat_template_text(config: Config, resume: bool) -> str | None:
    """The chat template to write into the run directory: `chat_template`'s for a new run (the
    file `config.chat_template`, else a fine-tune's base's, copied so the run is complete
    without the base), and on resume only a file `config.chat_template` names (a resumed run
    keeps the file it has; None = write none)."""
    if resume and not config.chat_template:
        return None
    return chat_template(config, None, resume=False)
