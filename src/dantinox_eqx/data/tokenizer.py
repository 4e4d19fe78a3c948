"""Tokenizers built with the `tokenizers` library and saved as a standard `tokenizer.json`.

- `char`: one token per Unicode character of the corpus (a WordLevel vocabulary over single
  characters, split by a regex that matches every character, newlines included).
- `bpe`: byte-level BPE trained on the corpus; bytes make every string encodable.

Both decode back to exactly the text they encoded (for `char`: text whose characters are in the
vocabulary), so `Tokenizer.from_file("tokenizer.json")` works outside this library too.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["build_tokenizer", "char_tokenizer", "bpe_tokenizer", "load_tokenizer", "save_tokenizer"]


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable, or text holds characters it cannot encode."""


def char_tokenizer(text: str) -> Tokenizer:
    """A character-level tokenizer whose vocabulary is the sorted set of characters in `text`."""
    chars = sorted(set(text))
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    # [\s\S] matches every character including "\n"; "isolated" makes each its own token.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join pieces with no separator
    return tok


def bpe_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE with `vocab_size` entries (at most), trained on `text`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Train on lines so the trainer sees bounded chunks; merges never cross pre-token borders.
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tok


def build_tokenizer(kind: str, text: str, vocab_size: int = 2048) -> Tokenizer:
    """`kind` is "char" or "bpe" (Config.tokenizer_type); `vocab_size` applies to bpe only."""
    if kind == "char":
        return char_tokenizer(text)
    if kind == "bpe":
        return bpe_tokenizer(text, vocab_size)
    raise TokenizerError(f"tokenizer_type: unknown tokenizer {kind!r}; choose char or bpe")


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Write `tok` as tokenizer.json atomically (temporary file, then rename).

    `source`: the file `tok` was read from. When it still describes `tok`, its text is written
    unchanged instead of `tok`'s own (compact) serialization, so a tokenizer.json imported from
    Hugging Face stays byte for byte the same through fine-tuning and export.
    """
    from ..files import atomic_write_text

    text = tok.to_str(pretty=False)
    if source is not None and Path(source).is_file():
        with open(source, encoding="utf-8", newline="") as f:  # newline="": line endings kept as they are
            original = f.read()
        try:
            if Tokenizer.from_str(original).to_str(pretty=False) == text:
                text = original
        except Exception:  # noqa: BLE001 (the library raises plain Exceptions for bad JSON): not a match
            pass
    atomic_write_text(Path(path), text)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {str(path)!r} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises plain Exception subclasses for bad JSON
        raise TokenizerError(f"tokenizer file {str(path)!r} is not a valid tokenizer.json: {e}") from None


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`; characters outside a char vocabulary raise TokenizerError."""
    if isinstance(tok.model, models.WordLevel):
        vocab = tok.get_vocab()
        missing = sorted(c for c in set(text) if c not in vocab)
        if missing:
            raise TokenizerError(
                f"text holds {len(missing)} character(s) outside the char vocabulary, e.g. {missing[:5]!r}"
            )
    return tok.encode(text).ids
