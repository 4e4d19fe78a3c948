"""Chat fine-tuning examples: JSONL rows -> token ids and per-token flags (issue 23).

A row is a conversation `{"messages": [{"role", "content"}, ...]}` (transformers' / the OpenAI
API's format) or a pair `{"prompt", "completion"}`. A conversation is rendered with the run's
chat template (`chat.render_chat`); a pair is rendered as the conversation [user: prompt,
assistant: completion] when there is a template, else as the plain text prompt + completion +
end-of-text.

Which text is trained (`train_on: assistant`): each assistant turn's span is found by RENDERING,
whatever the template (never transformers' `{% generation %}` tag, which most hub templates
lack): the span of turn i runs from the end of render(messages[:i], add_generation_prompt=True)
to the end of render(messages[:i+1]), so it holds the answer and the template's end-of-turn
token(s) (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`), and both prefixes must be prefixes
of the whole rendering (chat_spans.py; its SpanFinder renders a row once where the template's
layout allows). `train_on: all` trains every token.

Tokens: the rendered text is cut at the span boundaries and each piece encoded on its own,
without the tokenizer's added special tokens (the template renders BOS if the model wants one:
no double BOS), so a span starts on a token boundary exactly where a generation prompt ends at
inference. Flags per token (train/step.py's bits): STARTS on the example's first token,
TRAINED on every token of a span; the mask is on the predicted token, so the first answer token
is trained (its prediction from the generation prompt counts).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from . import tokenizer as tk
from .chat_spans import render_spans
from .sampling import DataError

__all__ = ["ROLES", "TRAIN_ON", "TRAINED", "STARTS", "parse_row", "is_chat_row", "render_spans",
           "special_tokens", "encode_example",
           "encode_examples"]

ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("assistant", "all")
TRAINED, STARTS = 1, 2  # = train.step.TRAINED / STARTS (data sits below train: not imported)
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


def is_chat_row(row: Any) -> bool:
    """Whether a parsed JSONL row is chat data (a conversation or a prompt/completion pair)."""
    return isinstance(row, dict) and ("messages" in row or ("prompt" in row and "completion" in row))


def parse_row(line: str, where: str) -> list[dict[str, str]] | tuple[str, str]:
    """The messages of a conversation row, or (prompt, completion) of a pair. `where` names the
    line ("data_path: chat.jsonl line 7") in the DataError of a malformed row."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: a JSON {type(row).__name__}, not an object with \"messages\" "
                        "(or \"prompt\" and \"completion\")")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field \"messages\" must be a non-empty list of {{\"role\", \"content\"}} "
                            f"objects, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: field \"messages\"[{i}] needs \"role\" and \"content\"")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: field \"messages\"[{i}].role is {m['role']!r}; use one of "
                                f"{', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: field \"messages\"[{i}].content must be a string, got "
                                f"{type(m['content']).__name__}")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in row and "completion" in row:
        for field in ("prompt", "completion"):
            if not isinstance(row[field], str):
                raise DataError(f"{where}: field \"{field}\" must be a string, got {type(row[field]).__name__}")
        return row["prompt"], row["completion"]
    raise DataError(f"{where}: no field \"messages\" (or \"prompt\" and \"completion\"); chat data rows are "
                    "{\"messages\": [{\"role\": ..., \"content\": ...}, ...]}")


def special_tokens(tok: Tokenizer) -> dict[str, str]:
    """The template variables bos_token / eos_token from the tokenizer's special tokens."""
    out = {}
    eot = tk.eot_id(tok)
    if eot is not None:
        out["eos_token"] = tok.id_to_token(eot)
    for name in _BOS_NAMES:
        if tok.token_to_id(name) is not None:
            out["bos_token"] = name
            break
    return out


def encode_example(tok: Tokenizer, text: str, spans: list[tuple[int, int]], train_on: str, where: str
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids int32 (n,), flags uint8 (n,), UTF-8 bytes of the trained text). DataError when the
    answer gets no trained token."""
    return encode_examples(tok, [(text, spans, where)], train_on)[0]


def encode_examples(tok: Tokenizer, items: list[tuple[str, list[tuple[int, int]], str]], train_on: str
                    ) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """`encode_example` of each (text, spans, where), all pieces in one batch encoding (the
    `tokenizers` library's threads: a row at a time is several times slower)."""
    cut_items, texts = [], []
    for text, spans, _ in items:
        cuts = sorted({0, len(text), *(c for span in spans for c in span)})
        pieces = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
        cut_items.append(pieces)
        texts.extend(text[a:b] for a, b in pieces)
    fast = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: less work, less memory
    encoded = iter(fast(texts, add_special_tokens=False))
    out = []
    for (text, spans, where), pieces in zip(items, cut_items):
        trained = set(spans)  # the spans are disjoint and the pieces cut at their ends: a span is one piece
        ids: list[int] = []
        lengths, inside, trained_bytes = [], [], 0
        for a, b in pieces:
            piece_ids = next(encoded).ids
            within = train_on == "all" or (a, b) in trained
            ids += piece_ids
            lengths.append(len(piece_ids))
            inside.append(within)
            trained_bytes += len(text[a:b].encode("utf-8")) if within else 0
        flags = np.repeat(np.where(inside, TRAINED, 0).astype(np.uint8), lengths)
        if not ids:
            raise DataError(f"{where}: the example renders to no tokens")
        flags[0] = STARTS  # the first token is never a target (no prediction reads across examples)
        if not (flags & TRAINED).any():
            raise DataError(f"{where}: the answer gets no trained token (an empty assistant turn, or no assistant "
                            "turn); give each example a non-empty answer")
        out.append((np.asarray(ids, np.int32), flags, trained_bytes))
    return out
