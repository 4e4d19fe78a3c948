"""Tokenizers built with the `tokenizers` library and saved as a standard `tokenizer.json`.

- `char`: one token per Unicode character of the corpus (a WordLevel vocabulary over single
  characters, split by a regex that matches every character, newlines included).
- `bpe`: byte-level BPE trained on the corpus (or on a bounded sample of it streamed by
  `prepare`); bytes make every string encodable.

Both decode back to exactly the text they encoded (for `char`: text whose characters are in the
vocabulary), so `Tokenizer.from_file("tokenizer.json")` works outside this library too.

Special tokens (new tokenizers; files written before them load and work as they are): the
end-of-text token `<|endoftext|>` separates documents in a prepared dataset and lets Hugging
Face clients pad and stop; char vocabularies also get `[UNK]` (their model's unknown token, so
outside clients map unseen characters to it instead of failing). Both come AFTER the ordinary
tokens, so the ordinary ids are the ones the same corpus got before: char `0..n-1` for the
sorted characters, then `<|endoftext|>` = n, `[UNK]` = n + 1; bpe `<|endoftext|>` is the last
id (`vocab_size - 1`).

Characters outside a char vocabulary (fine-tuning or evaluating on new text): `unknown_chars`
"error" (the default) refuses the text naming them, "drop" leaves them out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["build_tokenizer", "char_tokenizer", "bpe_tokenizer", "train_bpe", "load_tokenizer",
           "save_tokenizer", "encode", "encode_text", "drop_unknown_chars", "eot_id", "digest", "char_table",
           "batch_encoder",
           "EOT", "UNK", "UNKNOWN_CHARS"]

EOT = "<|endoftext|>"
UNK = "[UNK]"
UNKNOWN_CHARS = ("error", "drop")  # Config.unknown_chars
# End-of-text names of other tokenizer families, recognised in a given tokenizer.json
# (GPT-2's is EOT; Llama 3: <|end_of_text|>; Llama 2, Mistral, T5: </s>; Gemma: <eos>).
_EOT_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>")
_CHAR_SPLIT = r"[\s\S]"  # matches every character including "\n"


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable, or text holds characters it cannot encode."""


def char_tokenizer(text: str) -> Tokenizer:
    """A character-level tokenizer whose vocabulary is the sorted set of characters in `text`,
    then `<|endoftext|>` and `[UNK]` (special tokens; see the module docstring)."""
    chars = sorted(set(text))
    vocab = {c: i for i, c in enumerate(chars)} | {EOT: len(chars), UNK: len(chars) + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # [\s\S] matches every character including "\n"; "isolated" makes each its own token.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_CHAR_SPLIT), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join pieces with no separator
    tok.add_special_tokens([EOT, UNK])  # already in the vocabulary: marks them special, ids unchanged
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with `vocab_size` entries (at most; the last is `<|endoftext|>`), trained
    on the strings of `texts`, read one at a time (the trainer keeps word counts, not the text)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # one id left for the end-of-text token, appended after training
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([EOT])
    return tok


def bpe_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE with `vocab_size` entries (at most), trained on `text`."""
    # Train on lines so the trainer sees bounded chunks; merges never cross pre-token borders.
    return train_bpe(text.splitlines(keepends=True), vocab_size)


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


def digest(tok: Tokenizer) -> str:
    """SHA-256 (hex) of the tokenizer.json that `save_tokenizer` writes for `tok`: equal digests,
    equal tokenizers (a prepared dataset records its tokenizer's)."""
    return hashlib.sha256(tok.to_str(pretty=False).encode("utf-8")).hexdigest()


def eot_id(tok: Tokenizer) -> int | None:
    """The id of the tokenizer's end-of-text token (`<|endoftext|>`, or another family's name
    for it), or None for a tokenizer without one (char and bpe tokenizers written before
    end-of-text tokens existed)."""
    for name in _EOT_NAMES:
        found = tok.token_to_id(name)
        if found is not None:
            return found
    return None


def _unknown(tok: Tokenizer, text: str) -> list[str]:
    """The sorted characters of `text` outside a char (WordLevel) vocabulary; [] for others."""
    if not isinstance(tok.model, models.WordLevel):
        return []
    vocab = tok.get_vocab()
    return sorted(c for c in set(text) if c not in vocab)


def check_unknown_chars(unknown_chars: str) -> None:
    if unknown_chars not in UNKNOWN_CHARS:
        raise TokenizerError(f"unknown_chars: unknown value {unknown_chars!r}; choose error or drop")


def drop_unknown_chars(tok: Tokenizer, text: str, unknown_chars: str = "error") -> str:
    """`text` ready for a char vocabulary: unchanged when every character is in it; else
    TokenizerError naming them ("error") or the text without them ("drop")."""
    check_unknown_chars(unknown_chars)
    missing = _unknown(tok, text)
    if not missing:
        return text
    if unknown_chars == "error":
        raise TokenizerError(
            f"text holds {len(missing)} character(s) outside the char vocabulary, e.g. {missing[:5]!r}; "
            "set unknown_chars: drop to leave them out"
        )
    return text.translate(dict.fromkeys(map(ord, missing)))


def encode(tok: Tokenizer, text: str, unknown_chars: str = "error") -> list[int]:
    """Token ids of `text`; characters outside a char vocabulary raise TokenizerError, or with
    `unknown_chars="drop"` are left out."""
    return tok.encode(drop_unknown_chars(tok, text, unknown_chars)).ids


def char_table(tok: Tokenizer) -> np.ndarray | None:
    """For a plain char tokenizer (ours: WordLevel over single characters, split on every
    character, no normalizer), the id of every code point (-1 outside the vocabulary) as an
    int32 array of 0x110000 entries; None for any other tokenizer."""
    if not isinstance(tok.model, models.WordLevel):
        return None
    spec = json.loads(tok.to_str())
    split = spec.get("pre_tokenizer") or {}
    if (spec.get("model", {}).get("type") != "WordLevel" or spec.get("normalizer") is not None
            or split.get("type") != "Split" or split.get("pattern") != {"Regex": _CHAR_SPLIT}
            or split.get("behavior") != "Isolated" or split.get("invert")):
        return None
    special = {t["content"] for t in spec.get("added_tokens", [])}
    table = np.full(0x110000, -1, np.int32)
    for piece, i in tok.get_vocab().items():
        if piece in special:
            continue
        if len(piece) != 1:
            return None
        table[ord(piece)] = i
    return table


def batch_encoder(tok: Tokenizer, unknown_chars: str = "error") -> Callable[[list[str]], list[np.ndarray]]:
    """A function that encodes a list of texts to one int32 id array each, for `prepare`.

    Special-token names inside the texts are encoded as ordinary text (only the separators that
    `prepare` inserts are end-of-text tokens), and no special tokens are added around a text.
    A plain char tokenizer is applied as a code-point lookup table in numpy (the same ids as the
    `tokenizers` library gives, about 100x faster); any other tokenizer runs the library's
    multi-threaded batch encoding. Characters outside a char vocabulary raise TokenizerError
    ("error") or are left out ("drop")."""
    check_unknown_chars(unknown_chars)
    table = char_table(tok)
    if table is not None:
        def encode_chars(texts: list[str]) -> list[np.ndarray]:
            out = []
            for text in texts:
                ids = table[np.frombuffer(text.encode("utf-32-le"), np.uint32)]
                if (ids < 0).any():
                    drop_unknown_chars(tok, text, unknown_chars)  # raises for "error"
                    ids = ids[ids >= 0]
                out.append(ids)
            return out

        return encode_chars
    plain = Tokenizer.from_str(tok.to_str())  # a copy: the flag below must not reach the caller's
    plain.encode_special_tokens = True
    wordlevel = isinstance(tok.model, models.WordLevel)
    fast = getattr(plain, "encode_batch_fast", plain.encode_batch)  # no offsets: less work, less memory

    def encode_texts(texts: list[str]) -> list[np.ndarray]:
        if wordlevel:
            texts = [drop_unknown_chars(tok, t, unknown_chars) for t in texts]
        return [np.asarray(e.ids, np.int32) for e in fast(texts, add_special_tokens=False)]

    return encode_texts


# A cut between a letter or digit and a space followed by one: a pre-token border for the GPT-2
# byte-level regex (a letter/digit run ends there, and ` ?\p{L}+` / ` ?\p{N}+` starts at the
# space), with ASCII classes so that no Unicode definition of a letter or a space can disagree.
_SAFE_CUT = re.compile(r"[A-Za-z0-9] [A-Za-z0-9]")
ENCODE_PIECE_CHARS, ENCODE_BATCH_PIECES = 1 << 20, 8


def _splits_exactly(tok: Tokenizer) -> bool:
    """Whether `tok` encodes a text cut at `_SAFE_CUT` borders piece by piece to exactly the
    ids of the whole text: byte-level BPE with the GPT-2 regex, no prefix space, no normalizer,
    and no post-processor adding tokens (ours, and GPT-2's own tokenizer.json)."""
    spec = json.loads(tok.to_str())
    pre, post = spec.get("pre_tokenizer") or {}, spec.get("post_processor")
    return (spec.get("model", {}).get("type") == "BPE" and spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
            and (post is None or post.get("type") == "ByteLevel"))


def _pieces(text: str, size: int) -> Iterable[str]:
    """`text` in pieces of about `size` characters, each cut at a `_SAFE_CUT` border (the rest
    of the text is one piece when none follows)."""
    start = 0
    while len(text) - start > size:
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            break
        yield text[start:m.start() + 1]
        start = m.start() + 1
    yield text[start:]


def encode_text(tok: Tokenizer, text: str, unknown_chars: str = "error",
                piece_chars: int = ENCODE_PIECE_CHARS) -> np.ndarray:
    """`encode(tok, text, unknown_chars)` as an int32 array, with memory that does not grow
    with the text (about 20 bytes per character of one piece, not the library's ~400 per
    character of a whole-text `Encoding`): a plain char vocabulary is a code-point lookup in
    numpy, byte-level BPE (`_splits_exactly`) is encoded in pieces of about `piece_chars` cut
    where pre-tokens end anyway, so the ids are exactly the whole text's. A text that holds a
    special token's name (the library matches those first) or any other tokenizer is encoded
    whole. tests/test_tokenizer_data.py checks the equality."""
    check_unknown_chars(unknown_chars)
    specials = [t["content"] for t in json.loads(tok.to_str()).get("added_tokens", [])]
    if any(name in text for name in specials):
        return np.asarray(encode(tok, text, unknown_chars), np.int32)
    table = char_table(tok)
    if table is not None:
        ids = np.empty(len(text), np.int32)  # one id per character
        for i in range(0, len(text), piece_chars):
            ids[i:i + piece_chars] = table[np.frombuffer(text[i:i + piece_chars].encode("utf-32-le"), np.uint32)]
        if (ids < 0).any():
            drop_unknown_chars(tok, text, unknown_chars)  # raises for "error", naming the characters
            ids = ids[ids >= 0]
        return ids
    if not _splits_exactly(tok):
        return np.asarray(encode(tok, text, unknown_chars), np.int32)
    fast = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: less work, less memory
    out, batch = [], []
    for piece in _pieces(text, piece_chars):
        batch.append(piece)
        if len(batch) == ENCODE_BATCH_PIECES:  # a batch: the library encodes it on every core
            out += [np.asarray(e.ids, np.int32) for e in fast(batch)]
            batch = []
    out += [np.asarray(e.ids, np.int32) for e in fast(batch)] if batch else []
    return np.concatenate(out) if out else np.zeros(0, np.int32)
