"""The assistant spans of a rendered conversation, found by rendering (issue 23), at one render a row.

    text, spans = render_spans(messages, template, where, special)     # per-turn rendering
    find = SpanFinder(template, special); text, spans = find(row, where)  # the same, ~1 render a row

PER-TURN RENDERING (`render_spans`, the definition): the span of assistant turn i runs from the
end of render(messages[:i], add_generation_prompt=True) to the end of render(messages[:i+1]),
both of which must be prefixes of the whole rendering; it holds the answer and the template's
end-of-turn token(s). That is 1 + 2 renders per assistant turn (the last turn's end is the whole
text's end when the conversation ends with it: one render fewer).

LAYOUTS (`SpanFinder`): most templates lay a conversation out from its ROLES alone, the contents
pasted in. So per role sequence the per-turn rendering runs once on placeholder contents (a
LAYOUT: the literal text between the contents and where each span boundary falls), and each
row is rendered ONCE: when that rendering equals the layout with the row's contents pasted in,
the spans are the layout's, moved by the contents' lengths; otherwise (a template that changes
a content, e.g. `| trim` of a content with outer spaces, or lays out by content) the row takes
the per-turn rendering. A layout is also checked against the per-turn rendering of the first
real row it fits (and dropped if they disagree), which catches a template whose generation
prompt, absent from the whole text, depends on what the contents say.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

from .chat import render_chat
from .sampling import DataError

__all__ = ["render", "render_spans", "SpanFinder", "Row"]

Row = list[dict[str, str]] | tuple[str, str]  # chat_data.parse_row's result
Spans = list[tuple[int, int]]
_PROBE = "\x00dantinox-content-{}\x00"  # a placeholder content: no template writes NUL itself
_PROBE_RE = re.compile("\x00dantinox-content-(\\d+)\x00")


def render(template: str, messages: list[dict[str, str]], where: str, special: dict[str, str], **kw: Any) -> str:
    """`render_chat`, its failures as DataError naming `where`."""
    try:
        return render_chat(template, messages, **kw, **special)
    except Exception as e:  # noqa: BLE001 - any failure of the user's template is bad input (whose error type
        # is chat.py's business: jinja's, or its own for raise_exception)
        raise DataError(f"{where}: the chat template failed: {e}") from None


def _as_messages(row: Row, template: str | None, where: str, special: dict[str, str]
                 ) -> list[dict[str, str]] | tuple[str, Spans]:
    """The row's messages, or (text, spans) directly for a pair without a template."""
    if isinstance(row, tuple):
        if template is None:
            prompt, completion = row
            eos = special.get("eos_token", "")
            return prompt + completion + eos, [(len(prompt), len(prompt) + len(completion) + len(eos))]
        row = [{"role": "user", "content": row[0]}, {"role": "assistant", "content": row[1]}]
    if template is None:
        raise DataError(f"{where}: a conversation needs a chat template: this run has none; pass "
                        "--chat_template FILE (a Jinja chat template)")
    return row


def _turn_spans(messages: list[dict[str, str]], text: str, rend: Any, where: str) -> Spans:
    """Per-turn rendering's spans of `messages`, whose whole rendering is `text`; `rend(messages,
    where, **kw)` renders."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = rend(messages[:i], where, add_generation_prompt=True)
        after = text if i + 1 == len(messages) else rend(messages[:i + 1], where)
        if not (after.startswith(before) and text.startswith(after)):
            raise DataError(f"{where}: the chat template does not render the conversation up to message {i} as a "
                            "prefix of the whole; its assistant turns cannot be found by rendering")
        spans.append((len(before), len(after)))
    return spans


def render_spans(row: Row, template: str | None, where: str, special: dict[str, str]) -> tuple[str, Spans]:
    """(the example's text, the character spans [a, b) of its assistant turns) by per-turn
    rendering (module docstring). A pair without a template is prompt + completion + eos_token."""
    messages = _as_messages(row, template, where, special)
    if isinstance(messages, tuple):
        return messages
    def rend(msgs: list[dict[str, str]], at: str, **kw: Any) -> str:
        return render(template, msgs, at, special, **kw)

    text = rend(messages, where)
    return text, _turn_spans(messages, text, rend, where)


class _Layout:
    """A role sequence's rendering with placeholder contents: literals[0] + content[refs[0]] +
    literals[1] + ... + literals[-1]; each span boundary as (k, offset): `offset` characters
    into literals[k]."""

    def __init__(self, text: str, spans: Spans):
        parts = _PROBE_RE.split(text)  # literal, ref, literal, ref, ..., literal
        self.literals, self.refs = parts[0::2], [int(r) for r in parts[1::2]]
        starts, at = [], 0  # where each literal starts in `text`
        for k, lit in enumerate(self.literals):
            starts.append(at)
            at += len(lit) + (len(_PROBE.format(self.refs[k])) if k < len(self.refs) else 0)
        self.bounds = [self._place(starts, c) for span in spans for c in span]

    def _place(self, starts: list[int], c: int) -> tuple[int, int]:
        for k in range(len(self.literals) - 1, -1, -1):
            if starts[k] <= c:
                if c - starts[k] > len(self.literals[k]):
                    raise ValueError("a span boundary inside a content")  # no layout: per-turn rendering
                return k, c - starts[k]
        raise ValueError("before the text")

    def fill(self, contents: list[str]) -> tuple[str, Spans]:
        """The layout with `contents` pasted in, and its spans."""
        pieces, starts, at = [], [], 0
        for k, lit in enumerate(self.literals):
            starts.append(at)
            pieces.append(lit)
            at += len(lit)
            if k < len(self.refs):
                pieces.append(contents[self.refs[k]])
                at += len(pieces[-1])
        b = [starts[k] + off for k, off in self.bounds]
        return "".join(pieces), list(zip(b[0::2], b[1::2]))


class SpanFinder:
    """`render_spans` of rows rendered once each where a verified layout allows (module docstring).
    `renders` counts the template renders so far. Keeps at most `max_layouts` role sequences."""

    def __init__(self, template: str | None, special: dict[str, str], max_layouts: int = 1024):
        self.template, self.special, self.max_layouts = template, special, max_layouts
        self.layouts: OrderedDict[tuple[str, ...], list] = OrderedDict()
        self.renders = 0

    def _render(self, messages: list[dict[str, str]], where: str, **kw: Any) -> str:
        self.renders += 1
        return render(self.template, messages, where, self.special, **kw)

    def _layout(self, roles: tuple[str, ...]) -> _Layout | None:
        probe = [{"role": r, "content": _PROBE.format(j)} for j, r in enumerate(roles)]
        try:
            text = self._render(probe, "layout")
            return _Layout(text, _turn_spans(probe, text, self._render, "layout"))
        except (DataError, ValueError):
            return None  # the rows of these roles take per-turn rendering (which names a row's failure)

    def __call__(self, row: Row, where: str) -> tuple[str, Spans]:
        messages = _as_messages(row, self.template, where, self.special)
        if isinstance(messages, tuple):
            return messages
        roles = tuple(m["role"] for m in messages)
        if roles not in self.layouts:
            self.layouts[roles] = [self._layout(roles), False]  # [layout or None, confirmed by a real row]
            if len(self.layouts) > self.max_layouts:
                self.layouts.popitem(last=False)
        entry = self.layouts[roles]
        text = self._render(messages, where)
        if entry[0] is not None:
            filled, spans = entry[0].fill([m["content"] for m in messages])
            if filled == text:
                if entry[1]:
                    return text, spans
                checked = _turn_spans(messages, text, self._render, where)  # the first real row it fits
                entry[:] = [entry[0], True] if checked == spans else [None, False]
                return text, checked
        return text, _turn_spans(messages, text, self._render, where)
