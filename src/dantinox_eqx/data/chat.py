"""Chat templates: a conversation rendered to text exactly as transformers renders it.

`render_chat(template, messages, add_generation_prompt=..., bos_token=..., eos_token=...)` gives
the string `tokenizer.apply_chat_template(messages, tokenize=False, ...)` gives: the same Jinja
environment as transformers' `_compile_jinja_template` (utils/chat_template_utils.py, 5.x): an
`ImmutableSandboxedEnvironment` (templates from the hub are untrusted code) with `trim_blocks`,
`lstrip_blocks` and the `loopcontrols` extension; globals `raise_exception`, `strftime_now`,
`dict`, `namespace` (no underscore names); a `tojson` filter that does not escape HTML, with
`ensure_ascii=False`, `indent`, `separators`, `sort_keys`; the `{% generation %}` tag renders
its body. The template sees `messages`, `tools` and `documents` (None), `add_generation_prompt`,
and the special tokens and extra keywords passed (`bos_token`, `eos_token`, ...).

Errors: `ChatMessageError` (a `ChatError`, a ValueError) names the message index and field of a
malformed conversation; `ChatTemplateError` (a ChatError) a template that does not compile or
raises while rendering, prefixed with where the template came from (`source`).
"""

from __future__ import annotations

import json
import typing
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatError", "ChatMessageError", "ChatTemplateError", "ROLES", "check_messages", "compile_template",
           "render_chat", "end_of_turn"]

ROLES = ("system", "user", "assistant", "tool")  # the roles of transformers' and the OpenAI API's chats


class ChatError(ValueError):
    """A conversation or a chat template that cannot be rendered; the message says which and why."""


class ChatMessageError(ChatError):
    """A message that is not {role, content} strings; the message names its index and field."""


class ChatTemplateError(ChatError):
    """A template that does not compile or fails while rendering."""


# no_type_check (here and on render_chat): our checks, naming the index and field, must run on
# what users pass, not the test suite's generic runtime type checker.
@typing.no_type_check
def check_messages(messages: Any) -> list[dict[str, str]]:
    """`messages` if it is a list of {"role": str, "content": str} dicts with known roles (extra
    keys allowed and passed on), else ChatMessageError naming the index and the field."""
    if not isinstance(messages, list):
        raise ChatMessageError(f"messages: expected a list of {{role, content}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatMessageError(f"messages[{i}]: expected a {{role, content}} dict, got {type(m).__name__}")
        for field in ("role", "content"):
            if field not in m:
                raise ChatMessageError(f"messages[{i}].{field}: missing; every message needs a role and a content")
            if not isinstance(m[field], str):
                raise ChatMessageError(f"messages[{i}].{field}: expected a string, got {type(m[field]).__name__}")
        if m["role"] not in ROLES:
            raise ChatMessageError(f"messages[{i}].role: unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
    return messages


class _Generation(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (it marks assistant text for its
    masks); here it renders its body, so templates that use it compile and render the same."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, '); transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` in templates without the type's attributes (no sandbox escape through it)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` refusing underscore-prefixed attributes (CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's own signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore-prefixed attributes "
                                                  f"({name!r})")


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_Namespace)
    return env.from_string(template)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def compile_template(template: str, source: str = "chat template") -> jinja2.Template:
    """The compiled template (cached), or ChatTemplateError '<source>: ...' with Jinja's line."""
    if not isinstance(template, str) or not template.strip():
        raise ChatTemplateError(f"{source}: empty; a chat template is Jinja text such as transformers' chat_template")
    try:
        return _compile(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{source}: line {e.lineno}: {e.message}") from None


@typing.no_type_check
def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
                source: str = "chat template", **special_tokens: Any) -> str:
    """`messages` ([{"role", "content"}, ...], checked: ChatMessageError names the index and
    field) rendered by the Jinja chat `template` with transformers' semantics (module docstring).
    `add_generation_prompt` appends the assistant turn's opening; `special_tokens` (bos_token,
    eos_token, ... and any extra variables) are visible to the template. A template that fails
    to compile or render raises ChatTemplateError prefixed with `source` (name the file)."""
    messages = check_messages(messages)
    compiled = compile_template(template, source)
    context = {"tools": None, "documents": None, **special_tokens}
    try:
        return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               **context)
    except jinja2.exceptions.TemplateError as e:  # raise_exception(...), undefined attributes, sandbox refusals
        raise ChatTemplateError(f"{source}: rendering failed: {_first_line(e)}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise ChatTemplateError(f"{source}: rendering failed: {_first_line(e)}") from None


# Content that cannot occur in a template's own text: found in the rendering, it marks where the
# assistant's content ends.
_PROBE = "\x00dantinox-probe\x00"


def end_of_turn(template: str, special: list[str], *, eos_token: str | None = None, source: str = "chat template",
                **special_tokens: Any) -> str | None:
    """The token that ends an assistant turn in `template`: the special token (one of `special`,
    longest match first) that the template writes right after an assistant message's content
    (ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`, `</s>`, ...); `eos_token` when the template
    writes none there; None when there is neither."""
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    text = render_chat(template, conversation, source=source, eos_token=eos_token, **special_tokens)
    at = text.find(_PROBE)
    if at >= 0:
        after = text[at + len(_PROBE):].lstrip(" ")
        for token in sorted((t for t in special if t), key=len, reverse=True):
            if after.startswith(token):
                return token
    return eos_token
