"""Training on chat data end to end (issue 23): packed windows, the summary, bad input, resume."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dantinox_eqx.config import Config
from dantinox_eqx.train.trainer import Trainer, read_log

from .chat_fixtures import CHATML, chat_tokenizer
from .conftest import TINY, plays_text


def chat_files(folder: Path, n: int = 300) -> tuple[Path, Path, Path]:
    """(chat.jsonl, tokenizer.json, template file): "who speaks this line?" conversations from
    the plays (speaker lines end in '.' in tiny Shakespeare's layout: NAME:\\nline)."""
    folder.mkdir(parents=True, exist_ok=True)
    blocks = [b.split("\n", 1) for b in plays_text()[:200_000].split("\n\n")]
    blocks = [(name, line) for name, *rest in blocks if rest and name.isupper() and name.endswith(".")
              for line in rest[:1]]
    rows = []
    for i, (name, line) in enumerate(blocks[:n]):
        line = line.split("\n")[0][:40]
        if i % 3 == 0:
            rows.append({"prompt": f"Who says: {line}\n", "completion": name[:-1]})
        else:
            rows.append({"messages": [{"role": "system", "content": "Name the speaker."},
                                      {"role": "user", "content": f"Who says: {line}"},
                                      {"role": "assistant", "content": name[:-1]}]})
    data = folder / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tok = folder / "tokenizer.json"
    chat_tokenizer().save(str(tok))
    template = folder / "chatml.jinja"
    template.write_text(CHATML, encoding="utf-8")
    return data, tok, template


def chat_config(tok: Path, template: Path, **kw) -> Config:
    base = {**TINY, "vocab_size": None, "max_context": 512, "eval_iters": 2, "warmup_steps": 5, "batch_size": 4,
            "tokenizer_path": str(tok), "chat_template": str(template)}
    return Config(**{**base, **kw})


def _env(cache: Path) -> dict[str, str]:
    import os
    import sys
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu",
            "DANTINOX_EQX_CACHE": str(cache)}


@pytest.mark.slow
def test_training_on_chat_data_packs_and_learns_the_answers(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DANTINOX_EQX_CACHE", str(tmp_path / "cache"))
    data, tok, template = chat_files(tmp_path)
    out = Trainer(chat_config(tok, template, max_steps=40, eval_interval=10), progress=False).fit(
        data, run_dir=tmp_path / "run")
    summary = json.loads((out / "model_summary.json").read_text())["data"]
    assert summary["feed"] == "packed" and summary["chat"]["examples"] == 300
    packing = summary["chat"]["train_packing"]
    assert packing["answers_truncated"] == 0 and packing["bins"] < packing["examples"]  # several per window
    assert summary["chat"]["real_fraction"] >= 0.95, summary["chat"]
    assert (out / "chat_template.jinja").read_text() == CHATML  # the fine-tune keeps its template
    rows = read_log(out / "training_log.csv")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5, rows  # the answers' loss falls


def test_bad_chat_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path):
    data, tok, template = chat_files(tmp_path / "in", n=30)
    exe = Path(__import__("sys").executable).parent / "dantinox-eqx"
    cache, run = tmp_path / "cache", tmp_path / "run"
    bad = tmp_path / "in" / "bad.jsonl"
    lines = data.read_text().splitlines()
    bad.write_text("\n".join(lines[:4] + ['{"messages": [{"role": "user", "content": 3}]}'] + lines[4:]) + "\n")
    cases = [([str(data)], "line 2: a conversation needs a chat template"),  # no --chat_template
             ([str(bad), "--chat_template", str(template)], 'line 5: field "messages"[0].content must be a string')]
    for args, message in cases:
        proc = subprocess.run([str(exe), "train", "--data_path", *args, "--tokenizer_path", str(tok),
                               "--run_dir", str(run), "--max_steps", "2"], env=_env(cache), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not run.exists() and not (cache / "prepared").exists() or not any((cache / "prepared").iterdir())


@pytest.mark.slow
def test_resume_after_sigkill_on_chat_data_gives_identical_rows(tmp_path: Path, monkeypatch):
    from .test_trainer import EXACT, _train_and_kill

    monkeypatch.setenv("DANTINOX_EQX_CACHE", str(tmp_path / "cache"))
    data, tok, template = chat_files(tmp_path / "in")
    config = chat_config(tok, template, max_steps=120, eval_interval=10, grad_accum=2, dropout_rate=0.1,
                         max_context=128)
    killed = tmp_path / "killed"
    assert 60 <= _train_and_kill(tmp_path, config, data, killed, 60) < 120  # killed mid-run
    Trainer(config, progress=False).fit(data, run_dir=killed, resume=True)
    reference = Trainer(config, progress=False).fit(data, run_dir=tmp_path / "reference")
    got, want = read_log(killed / "training_log.csv"), read_log(reference / "training_log.csv")
    assert len(want) == 12
    assert [{k: r[k] for k in EXACT} for r in got] == [{k: r[k] for k in EXACT} for r in want]  # bitwise
