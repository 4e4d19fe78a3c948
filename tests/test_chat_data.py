"""Chat data (issue 23 item 3): assistant spans found by rendering, per-token masks, bad rows."""

import json

import numpy as np
import pytest

from dantinox_eqx.data.chat_data import STARTS, TRAINED, encode_example, parse_row, render_spans, special_tokens
from dantinox_eqx.data.chat_prepare import prepare_chat
from dantinox_eqx.data.packing import pack, read_bins
from dantinox_eqx.data.sampling import DataError
from dantinox_eqx.data.tokens import TokenStream, open_flags, open_prepared

from .chat_fixtures import CHATML, LLAMA3, ZEPHYR, chat_tokenizer

CONVERSATION = [{"role": "system", "content": "Answer as the Prince would."},
                {"role": "user", "content": "Who is there?"},
                {"role": "assistant", "content": "Nay, answer me: stand, and unfold yourself."},
                {"role": "user", "content": "Long live the king!"},
                {"role": "assistant", "content": "Bernardo?"}]
ANSWERS = [CONVERSATION[2]["content"], CONVERSATION[4]["content"]]
# Each template's end of an assistant turn, written out by hand: the end-of-turn token is TRAINED.
# Zephyr's ends with eos_token, here the tokenizer's <|endoftext|>; its generation prompt is
# '<|assistant|>' without the newline its turns have, so that newline is the answer's first token.
END_OF_TURN = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>", "zephyr": "<|endoftext|>"}
BEFORE = {"chatml": "", "llama3": "", "zephyr": "\n"}
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "zephyr": ZEPHYR}


def _pieces(tok, ids):
    return [tok.decode([i], skip_special_tokens=False) for i in ids]


@pytest.mark.parametrize("name", TEMPLATES)
def test_mask_covers_exactly_the_assistant_turns_and_their_end_of_turn_token(name):
    tok = chat_tokenizer()
    special = special_tokens(tok)
    text, spans = render_spans(CONVERSATION, TEMPLATES[name], "row", special)
    ids, flags, trained_bytes = encode_example(tok, text, spans, "assistant", "row")
    pieces = _pieces(tok, ids)
    assert "".join(pieces) == text  # nothing lost or added (ASCII text: each token decodes alone)
    # token by token: the trained tokens spell exactly the answers each followed by the end of turn
    runs, run = [], ""
    for piece, f in zip(pieces, flags):
        if f & TRAINED:
            run += piece
        elif run:
            runs.append(run)
            run = ""
    runs += [run] if run else []
    assert runs == [BEFORE[name] + a + END_OF_TURN[name] for a in ANSWERS]
    assert trained_bytes == sum(len(r) for r in runs)
    # the end-of-turn token itself is trained, and the first answer token (no off-by-one)
    eot = END_OF_TURN[name].strip()
    for answer in ANSWERS:
        answer = BEFORE[name] + answer
        first = next(i for i in range(len(ids)) if "".join(pieces[i:]).startswith(answer)
                     and "".join(pieces[:i]).endswith(("\n", ">")) and flags[i] & TRAINED)
        assert flags[first] & TRAINED and not flags[first - 1] & TRAINED
        after = first + next(j for j in range(len(ids) - first) if "".join(pieces[first:first + j]) == answer)
        assert pieces[after] == eot and flags[after] & TRAINED
    assert flags[0] == STARTS and not (flags[1:] & STARTS).any()


def test_no_double_bos_and_train_on_all():
    tok = chat_tokenizer()
    bos = tok.token_to_id("<|begin_of_text|>")
    assert tok.encode("hi").ids[0] == bos  # the tokenizer alone would add one
    text, spans = render_spans(CONVERSATION, LLAMA3, "row", special_tokens(tok))
    assert text.startswith("<|begin_of_text|>")  # ... and the template renders one
    ids, flags, _ = encode_example(tok, text, spans, "all", "row")
    assert list(ids).count(bos) == 1 and ids[0] == bos
    assert flags[0] == STARTS and (flags[1:] == TRAINED).all()  # all: every target trained


def test_prompt_completion_pairs():
    tok = chat_tokenizer()
    special = special_tokens(tok)
    row = parse_row(json.dumps({"prompt": "Who is there? ", "completion": "Nay, answer me."}), "row")
    text, spans = render_spans(row, None, "row", special)  # no template: plain text + end-of-text
    ids, flags, _ = encode_example(tok, text, spans, "assistant", "row")
    trained = "".join(p for p, f in zip(_pieces(tok, ids), flags) if f & TRAINED)
    assert trained == "Nay, answer me.<|endoftext|>"
    text, spans = render_spans(row, CHATML, "row", special)  # with one: a user/assistant conversation
    ids, flags, _ = encode_example(tok, text, spans, "assistant", "row")
    assert "".join(p for p, f in zip(_pieces(tok, ids), flags) if f & TRAINED) == "Nay, answer me.<|im_end|>\n"


BAD_ROWS = [
    ("{not json", "not JSON"),
    (json.dumps({"messages": "hello"}), 'field "messages" must be a non-empty list'),
    (json.dumps({"messages": [{"role": "user"}]}), 'field "messages"[0] needs "role" and "content"'),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), 'field "messages"[0].role is \'wizard\''),
    (json.dumps({"messages": [{"role": "user", "content": 3}]}), 'field "messages"[0].content must be a string'),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "the answer gets no trained token"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}),
     None),  # ChatML still trains the empty answer's <|im_end|>: accepted
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_rows_name_line_and_field_and_write_nothing(tmp_path, row, message):
    good = json.dumps({"messages": CONVERSATION[1:3]})
    src = tmp_path / "chat.jsonl"
    src.write_text(f"{good}\n{good}\n{row}\n", encoding="utf-8")
    out = tmp_path / "out"
    if message is None:
        prepare_chat(src, out, chat_tokenizer(), CHATML)
        assert (out / "index.json").is_file()
        return
    with pytest.raises(DataError) as e:
        prepare_chat(src, out, chat_tokenizer(), CHATML)
    assert str(e.value).startswith("data_path: chat.jsonl line 3: ") and message in str(e.value)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]  # nothing written


def test_no_template_and_failing_template(tmp_path):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": CONVERSATION[1:3]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: a conversation needs a chat template.*--chat_template"):
        prepare_chat(src, tmp_path / "a", chat_tokenizer(), None)
    with pytest.raises(DataError, match=r"line 1: the chat template failed: .*no system turn"):
        prepare_chat(src, tmp_path / "b", chat_tokenizer(), "{{ raise_exception('no system turn') }}")
    with pytest.raises(DataError, match=r"line 1: the chat template failed: "):
        prepare_chat(src, tmp_path / "c", chat_tokenizer(), "{% for %}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]


def test_prepared_chat_dataset_streams_tokens_and_flags(tmp_path):
    tok = chat_tokenizer()
    src = tmp_path / "chat.jsonl"
    rows = [{"messages": CONVERSATION}, {"prompt": "Who is there?", "completion": "Francisco."}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = prepare_chat(src, tmp_path / "prepared", tok, ZEPHYR)
    index = json.loads((out / "index.json").read_text())
    assert index["version"] == 2 and index["chat"]["examples"] == 2
    stream, _ = open_prepared(out)
    flags, chat = open_flags(out)
    expect_ids, expect_flags = [], []
    for r in rows:
        row = parse_row(json.dumps(r), "row")
        ids, f, _ = encode_example(tok, *render_spans(row, ZEPHYR, "row", special_tokens(tok)), "assistant", "row")
        expect_ids.append(ids), expect_flags.append(f)
    np.testing.assert_array_equal(stream.array(), np.concatenate(expect_ids))
    np.testing.assert_array_equal(flags.array(), np.concatenate(expect_flags))
    assert chat["trained_tokens"] == int(sum((f & TRAINED > 0).sum() for f in expect_flags))


def test_packing_bins_cut_and_drop():
    # examples (length, first trained position), packed best-fit decreasing into windows of 8
    examples = [(3, 1), (4, 2), (2, 1), (11, 3), (12, 9), (5, 4), (1, None)]
    # at offsets 0 3 7 9 20 32 37
    flags = []
    for n, first in examples:
        f = [STARTS] + [0] * (n - 1)
        if first is not None:
            f[first:] = [TRAINED] * (n - first)
        flags += f
    stream = TokenStream([np.asarray(flags, np.uint8)], [0.0])
    p = pack(stream, 8)
    # 11 is cut to 8 (a bin of its own); 12 dropped (its answer starts at 9: past the window);
    # longest first: 5 opens a bin (room 3), 4 opens another (room 4), 3 fills the first, 2 and 1
    # go to the second
    bins = [list(zip(p.offsets[a:b], p.lengths[a:b])) for a, b in zip(p.bins, p.bins[1:])]
    assert bins == [[(9, 8)], [(32, 5), (0, 3)], [(3, 4), (7, 2), (37, 1)]]
    assert p.stats == {"examples": 7, "bins": 3, "examples_cut": 1, "answers_truncated": 1,
                       "real_fraction": round(23 / 24, 4)}
    tokens = TokenStream([np.arange(len(flags), dtype=np.uint16)], [0.0])
    t, f = read_bins(tokens, stream, p, np.array([[2, 1]]))
    np.testing.assert_array_equal(t[0, 0], [3, 4, 5, 6, 7, 8, 37, 0])  # whole examples, then padding
    np.testing.assert_array_equal(f[0, 0], [STARTS, 0, TRAINED, TRAINED, STARTS, TRAINED, STARTS, STARTS])
    np.testing.assert_array_equal(t[0, 1], [32, 33, 34, 35, 36, 0, 1, 2])


def test_prepare_cli_on_chat_jsonl(tmp_path, monkeypatch, capsys):
    from .test_prepare import run_cli

    src, tok, tpl = tmp_path / "chat.jsonl", tmp_path / "tokenizer.json", tmp_path / "t.jinja"
    src.write_text(json.dumps({"messages": CONVERSATION}) + "\n", encoding="utf-8")
    chat_tokenizer().save(str(tok))
    tpl.write_text(LLAMA3, encoding="utf-8")
    code, out, err = run_cli(monkeypatch, capsys, src, tmp_path / "none")  # no tokenizer: refused
    assert code == 2 and "tokenizer_path" in err and not (tmp_path / "none").exists()
    code, out, err = run_cli(monkeypatch, capsys, src, tmp_path / "out", "--tokenizer_path", tok,
                             "--chat_template", tpl, "--train_on", "all")
    assert code in (0, None), err
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["version"] == 2 and index["chat"]["train_on"] == "all"
    assert index["chat"]["trained_tokens"] == index["total_tokens"] - 1  # all but the first token
