"""How much text each token stands for: UTF-8 bytes and characters per token id (bits per byte
and per character, tokens.py and infer/evaluate.py), and the bytes behind a run of ids."""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

__all__ = ["token_byte_lengths", "token_char_lengths", "count_bytes"]


def _per_token(tok: Tokenizer, alphabet: Collection[str], of_piece: Callable[[str], float],
               of_text: Callable[[str], float]) -> np.ndarray:
    """One float64 per token id, shape (vocab,): `of_piece(piece)` for a byte-level BPE token
    whose string lies in `alphabet`, `of_text(decoded text)` for any other, 0 for special tokens."""
    byte_level = isinstance(tok.model, models.BPE) and isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    out = np.zeros(tok.get_vocab_size(), np.float64)
    for piece, i in tok.get_vocab().items():
        if piece in special:
            continue
        out[i] = of_piece(piece) if byte_level and set(piece) <= alphabet else of_text(tok.decode([i]))
    return out


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes that each token id stands for, shape (vocab,), float64: a byte-level BPE
    token's string has one character per byte; other tokens (a char vocabulary's characters)
    are measured on their decoded text; special tokens (end of text) stand for 0 bytes."""
    return _per_token(tok, set(pre_tokenizers.ByteLevel.alphabet()), len, lambda text: len(text.encode("utf-8")))


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_char_lengths(tok: Tokenizer) -> np.ndarray:
    """Characters each token id stands for, shape (vocab,), float64, counted at their first
    UTF-8 byte: a byte-level BPE token counts its bytes that begin a character (so a
    character split over two tokens counts once, in the token that holds its lead byte); other
    tokens their decoded text's characters; special tokens 0. Summed over a text's ids: its
    characters, exactly."""
    to_byte = _bytes_to_unicode()
    return _per_token(tok, to_byte.keys(), lambda piece: sum(1 for c in piece if to_byte[c] & 0xC0 != 0x80), len)


def count_bytes(ids: np.ndarray, lengths: np.ndarray, chunk: int = 1 << 22) -> float:
    """UTF-8 bytes of the text behind token `ids` (chunked: O(chunk) extra memory)."""
    total = 0.0
    for a in range(0, len(ids), chunk):
        total += float(np.bincount(np.asarray(ids[a:a + chunk]), minlength=len(lengths))[:len(lengths)] @ lengths)
    return total
