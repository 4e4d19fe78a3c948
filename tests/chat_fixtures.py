"""Chat templates and a tiny byte-level BPE tokenizer with their special tokens (issue 23 tests)."""

from __future__ import annotations

import functools

from tokenizers import AddedToken, Tokenizer, processors

from dantinox_eqx.data.tokenizer import bpe_tokenizer

from .conftest import plays_text

# SmolLM2-135M-Instruct's chat template (GGUF key tokenizer.chat_template), verbatim: ChatML
# with a default system prompt when the conversation has none.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
          "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 3's layout: BOS rendered by the template, a header per turn, <|eot_id|> ends each turn.
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Zephyr's: a system turn, </s> (the eos_token) ends each turn.
ZEPHYR = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + "
          "eos_token }}{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token }}"
          "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
          "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


@functools.cache
def _tokenizer_json() -> str:
    tok = bpe_tokenizer(plays_text()[:30_000], 300)
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS if tok.token_to_id(t) is None])
    # like Llama's tokenizer.json: BOS added on encode (the chat path must not add a second)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    return tok.to_str()


def chat_tokenizer() -> Tokenizer:
    """A 300-entry byte-level BPE (trained on the plays) with the templates' special tokens."""
    return Tokenizer.from_str(_tokenizer_json())
