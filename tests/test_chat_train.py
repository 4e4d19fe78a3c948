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


@pytest.mark.slow
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


@pytest.mark.slow
def test_document_mask_on_plain_documents(tmp_path: Path, monkeypatch):
    from tokenizers import Tokenizer, models

    from dantinox_eqx.config import ConfigError
    from dantinox_eqx.data.tokens import open_splits
    from dantinox_eqx.train.programs import document_separator

    monkeypatch.setenv("DANTINOX_EQX_CACHE", str(tmp_path / "cache"))
    docs = tmp_path / "docs.jsonl"  # short documents: prepare puts <|endoftext|> after each
    speeches = [s for s in plays_text()[:60_000].split("\n\n") if len(s) > 20]
    docs.write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches), encoding="utf-8")
    config = Config(**{**TINY, "vocab_size": None, "max_context": 32, "max_steps": 20, "eval_interval": 10,
                       "document_mask": True})
    splits = open_splits(docs, config, cache_dir=tmp_path / "cache")
    assert document_separator(config, splits) == splits.tokenizer.token_to_id("<|endoftext|>")
    assert document_separator(config.replace(document_mask=False), splits) is None
    no_eot = splits.__class__(splits.train, splits.val, Tokenizer(models.WordLevel({"a": 0}, unk_token=None)))
    with pytest.raises(ConfigError, match="document_mask: the tokenizer has no end-of-text token"):
        document_separator(config, no_eot)
    rows = {}
    for mask in (True, False):
        out = Trainer(config.replace(document_mask=mask), progress=False).fit(docs, run_dir=tmp_path / f"run{mask}")
        rows[mask] = read_log(out / "training_log.csv")
    # same data, seed and batches: only the masks differ, and the losses with them
    assert all(abs(a["val_loss"] - b["val_loss"]) > 1e-4 for a, b in zip(rows[True], rows[False]))
    assert rows[True][-1]["val_loss"] < rows[True][0]["val_loss"]


def test_packing_fill_reported_is_what_the_batches_hold(tmp_path: Path):
    """The summary's `real_fraction` (the share of the packed windows' slots holding real tokens)
    is counted again from the windows the feed reads (read_bins, every bin of the training split:
    the feed draws bins uniformly, so it is also each batch's expected fill), and on the example
    data it is at least 95 %."""
    import numpy as np

    from dantinox_eqx.data.chat_data import STARTS, TRAINED
    from dantinox_eqx.data.packing import read_bins
    from dantinox_eqx.data.tokens import open_splits

    data, tok, template = chat_files(tmp_path)
    splits = open_splits(data, chat_config(tok, template), chat_tokenizer(), "tokenizer_path", tmp_path / "cache",
                         CHATML)
    packing = splits.packing["train"]
    tokens, flags = read_bins(splits.train, splits.train_flags, packing, np.arange(len(packing)))
    segment = np.cumsum(flags & STARTS, axis=1)  # (bins, window): each example, and the padding, a segment
    real = 0
    for row_segments, row_flags in zip(segment, flags):
        trained = np.unique(row_segments[(row_flags & TRAINED) > 0])  # padding has no trained token; every
        real += int(np.isin(row_segments, trained).sum())  # packed example has one (else it is dropped)
    measured = real / flags.size
    assert real == int(packing.lengths.sum())  # every example's tokens are in the windows, nothing else
    reported = splits.describe("packed")["chat"]["real_fraction"]
    assert reported == round(measured, 4) and measured >= 0.95, (reported, measured)
