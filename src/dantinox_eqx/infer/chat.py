"""A conversation as prompt ids for `Generator.chat`: rendered with the chat template, encoded
as transformers' apply_chat_template(tokenize=True) encodes it, with the ids that end the answer."""

from __future__ import annotations

from tokenizers import Tokenizer

from ..data.chat import ChatTemplateError, end_of_turn, render_chat
from ..data.tokenizer import drop_unknown_chars, eot_id

__all__ = ["chat_ids"]


def chat_ids(tokenizer: Tokenizer, template: str | None, messages: list[dict[str, str]],
             special_tokens: dict[str, str], source: str = "chat_template") -> tuple[list[int], list[int]]:
    """(the prompt ids of `messages` rendered by `template` with add_generation_prompt, the ids
    that end the answer).

    The ids are the rendered text's without the tokenizer's own BOS (add_special_tokens=False,
    as transformers encodes a rendered chat): a template that writes bos_token has it once, not
    twice. The answer ends at the end-of-turn token (`end_of_turn`: the special token the
    template writes after an assistant message), at `special_tokens["eos_token"]` and at the
    tokenizer's end-of-text token. ChatTemplateError when there is no template (naming
    --chat_template), or it fails (naming `source`); ChatMessageError for a bad message."""
    if template is None:
        raise ChatTemplateError("chat_template: this run has no chat template (no chat_template.jinja in it "
                                "or its base runs); pass one with --chat_template FILE "
                                "(Generator(..., chat_template=text))")
    text = render_chat(template, messages, add_generation_prompt=True, source=source, **special_tokens)
    specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
    end = end_of_turn(template, specials, source=source, **special_tokens)
    end_ids = [i for i in (None if end is None else tokenizer.token_to_id(end),
                           tokenizer.token_to_id(special_tokens.get("eos_token") or ""), eot_id(tokenizer))
               if i is not None]
    plain = text  # a char vocabulary must hold every character outside the special tokens
    for token in sorted(specials, key=len, reverse=True):
        plain = plain.replace(token, "")
    drop_unknown_chars(tokenizer, plain, "error")
    return tokenizer.encode(text, add_special_tokens=False).ids, list(dict.fromkeys(end_ids))
