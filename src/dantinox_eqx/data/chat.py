"""Chat templates: render a conversation with a Jinja chat template, with transformers' semantics.

Minimal stand-in (branch `chatdata`) for the `chat` branch's module of the same name: the same
`render_chat` signature and the run-dir functions; the lead keeps that branch's at merge.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["CHAT_TEMPLATE_FILE", "ChatTemplateError", "render_chat", "read_chat_template", "write_chat_template"]

CHAT_TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """The template does not compile, or raised (`raise_exception`) while rendering."""


def _raise(message: str) -> None:
    raise ChatTemplateError(f"raise_exception({message!r})")


@functools.lru_cache(maxsize=8)  # compiling costs ~1 ms; a dataset renders one template per row
def _compiled(template: str) -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                 ensure_ascii=ensure_ascii)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"it does not compile: {e}") from None


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
                **special_tokens: Any) -> str:
    """The text of `messages` ([{"role", "content"}, ...]) under the Jinja `template`, as
    transformers' `apply_chat_template(tokenize=False)` renders it; `special_tokens` (bos_token,
    eos_token, ...) are the template's variables. ChatTemplateError when it fails."""
    from jinja2.exceptions import TemplateError

    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          **special_tokens)
    except ChatTemplateError:
        raise
    except (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise ChatTemplateError(f"{type(e).__name__}: {e}") from None


def read_chat_template(run_dir: str | os.PathLike) -> str | None:
    """The run's chat template (`chat_template.jinja` in it), or None."""
    path = Path(run_dir) / CHAT_TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def write_chat_template(run_dir: str | os.PathLike, template: str) -> None:
    from ..files import atomic_write_text

    atomic_write_text(Path(run_dir) / CHAT_TEMPLATE_FILE, template)
