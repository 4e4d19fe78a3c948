"""Chat spans at one render a row (chat_spans.SpanFinder): the same text and spans as per-turn
rendering for every template, and each row rendered once where the template's layout allows."""

import pytest

from dantinox_eqx.data.chat_data import special_tokens
from dantinox_eqx.data.chat_spans import SpanFinder, render_spans
from dantinox_eqx.data.sampling import DataError

from .chat_fixtures import CHATML, LLAMA3, ZEPHYR, chat_tokenizer
from .chat_templates import DEFAULT_SYSTEM

# The generation prompt depends on what the last user message says (the assistant header after a
# question, nothing otherwise): the whole rendering is the same either way, so only the per-turn
# rendering of a real row can tell that the placeholder layout's span starts elsewhere.
BY_CONTENT = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '</>' }}{% endfor %}"
              "{% if add_generation_prompt and messages[-1]['content'].endswith('?') %}{{ '<assistant>' }}{% endif %}")
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "zephyr": ZEPHYR, "default_system": DEFAULT_SYSTEM,
             "by_content": BY_CONTENT}


def _rows() -> list:
    u, a, s = "user", "assistant", "system"
    rows = []
    for i in range(12):
        q = f"Who is there, friend {i}?" if i % 2 == 0 else f"  Stand and unfold {i} "  # outer spaces: `| trim`
        rows.append([{"role": u, "content": q}, {"role": a, "content": f"Nay, answer me {i}."}])
        rows.append([{"role": s, "content": "Be brief."}, {"role": u, "content": q},
                     {"role": a, "content": "Bernardo" * (i + 1)}])
        rows.append([{"role": u, "content": q}, {"role": a, "content": "Yes."}, {"role": u, "content": "And?"},
                     {"role": a, "content": f"Long live the king {i}!"}])
    rows.append(("Who is there? ", "Nay, answer me."))  # a prompt/completion pair
    return rows


def _outcome(f, *args):
    try:
        return f(*args)
    except DataError as e:  # a template whose turns are no prefixes (default_system's Llama 2 layout)
        return str(e)


@pytest.mark.parametrize("name", TEMPLATES)
def test_one_render_a_row_gives_the_per_turn_spans(name):
    template, special = TEMPLATES[name], special_tokens(chat_tokenizer())
    find, rows = SpanFinder(template, special), _rows()
    for i, row in enumerate(rows):
        where = f"row {i}"
        assert _outcome(find, row, where) == _outcome(render_spans, row, template, where, special), (name, i)
    if name in ("chatml", "zephyr"):  # layouts from the roles alone: one render a row, plus per role sequence
        # its layout (1 + 2 per answer - 1) and the check on the first real row it fits (2 per answer - 1)
        per_sequence = {1: 1 + 1 + 1, 2: 1 + 3 + 3}
        assert find.renders == len(rows) + per_sequence[1] * 2 + per_sequence[2]


def test_a_template_that_lays_out_by_content_falls_back_to_per_turn_rendering():
    special = special_tokens(chat_tokenizer())
    find = SpanFinder(BY_CONTENT, special)
    row = [{"role": "user", "content": "Who is there?"}, {"role": "assistant", "content": "Nay."}]
    text, spans = find(row, "row 1")
    assert (text, spans) == render_spans(row, BY_CONTENT, "row 1", special)
    assert text[spans[0][0]:spans[0][1]] == "Nay.</>"  # after a question the header is the prompt's
    assert SpanFinder(BY_CONTENT, special).layouts == {}
    layout_spans = SpanFinder(BY_CONTENT, special)._layout(("user", "assistant")).fill(["Who is there?", "Nay."])[1]
    assert layout_spans != spans  # what the placeholders' layout alone would have given
    assert find.layouts[("user", "assistant")][0] is None  # the layout disagreed with the real row: dropped
