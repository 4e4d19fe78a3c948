"""benchmarks/speaker_task.py's data (the real-model run itself is the benchmark, not a test):
speeches parsed from a play, a held-out split that shares no passage with train, chat rows."""

import importlib.util
import json

from dantinox_eqx.data.chat_data import parse_row

from .conftest import ROOT, play_text

_spec = importlib.util.spec_from_file_location("speaker_task", ROOT / "benchmarks" / "speaker_task.py")
task = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task)


def test_speeches_parse_headings_and_drop_stage_directions():
    found = task.speeches(play_text("romeo_and_juliet"))
    assert found[0] == ("Chor", found[0][1]) and found[0][1][0] == "Two households, both alike in dignity,"
    assert len(found[0][1]) == 14  # the prologue's sonnet
    assert found[1] == ("Sampson", ["Gregory, o' my word, we'll not carry coals."])
    assert not any("[" in line or "]" in line for _, body in found for line in body)
    assert task.speaker_name("Friar", "romeo_and_juliet") == "Friar Lawrence"
    assert task.speaker_name("LADY MACBETH", "macbeth") == "Lady Macbeth"


def test_held_out_passages_never_in_train(tmp_path):
    texts = {"romeo_and_juliet_gut.txt": play_text("romeo_and_juliet")}
    train, held = task.build(texts, ["romeo_and_juliet"], 8, 4, 40, 0.15, 0)
    assert len({r["speaker"] for r in train}) == 8 and 0.1 < len(held) / (len(train) + len(held)) < 0.25
    assert not {r["text"] for r in held} & {r["text"] for r in train}
    assert all(len(r["text"]) >= 40 and r["text"].count("\n") < 4 for r in train + held)
    assert task.build(texts, ["romeo_and_juliet"], 8, 4, 40, 0.15, 0) == (train, held)  # deterministic
    task.write_jsonl(tmp_path / "held.jsonl", held)
    rows = [parse_row(line, "held.jsonl") for line in (tmp_path / "held.jsonl").read_text().splitlines()]
    assert [m[1] for m in rows] == [{"role": "assistant", "content": r["speaker"]} for r in held]
    assert rows[0][0]["content"].endswith("\n" + held[0]["text"])
    assert json.loads((tmp_path / "held.jsonl").read_text().splitlines()[0])["messages"][0]["role"] == "user"
