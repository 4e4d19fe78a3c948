"""Every command that takes --data_path takes every source `train` takes (issue 24 item 2):
sweep, find-lr --population and eval read a prepared directory, a folder or a JSONL file as
training reads them (train/inputs.training_data), and refuse a bad source with exit 2 naming
data_path, writing nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli.main import app
from click.testing import CliRunner

from dantinox_eqx.config import Config
from dantinox_eqx.data.prepare import prepare_dataset
from dantinox_eqx.data.tokenizer import char_tokenizer, load_tokenizer
from dantinox_eqx.train import lr_finder
from dantinox_eqx.train.trainer import Trainer

from .conftest import TINY, plays_slice
from .prepared import char_tokenizer_with_eot, split_docs, write_prepared

BASE = dict(TINY, vocab_size=None, max_steps=4, eval_interval=2, eval_iters=1, batch_size=2, warmup_steps=1)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Sources prepared on first use go to this test's cache, not the user's."""
    monkeypatch.setenv("DANTINOX_EQX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    return plays_slice(tmp_path_factory.mktemp("text") / "corpus.txt", 20_000).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, text) -> Path:
    """A tiny finished run on the text (char tokenizer trained on it)."""
    d = tmp_path_factory.mktemp("base")
    corpus = d / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    return Trainer(Config(**BASE), progress=False).fit(corpus, run_dir=d / "run")


def _config(tmp_path: Path, **over) -> Path:
    path = tmp_path / "config.yaml"
    Config(**{**BASE, **over}).to_yaml(path)
    return path


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def _refused(result, what: str) -> None:
    assert result.exit_code == 2, result.output
    assert "data_path" in result.output and what in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_sweep_runs_on_a_prepared_directory(tmp_path, text):
    data = write_prepared(tmp_path / "ds", split_docs(text, 10), char_tokenizer_with_eot(text))
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"method": "grid", "metric": {"name": "val_loss", "goal": "minimize"},
                                    "parameters": {"lr": {"values": [1e-3, 3e-3]}}}))
    out = CliRunner().invoke(app, ["sweep", "--sweep_config", str(spec), "--data_path", str(data), "--config",
                                   str(_config(tmp_path)), "--backend", "local", "--count", "2",
                                   "--sweep_dir", str(tmp_path / "sw")])
    assert out.exit_code == 0, out.output
    with open(tmp_path / "sw" / "sweep_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["lr"]) for r in rows) == [1e-3, 3e-3] and {r["status"] for r in rows} == {"complete"}
    for r in rows:  # each trial trained on the prepared dataset, with its tokenizer and the host feed
        run = tmp_path / "sw" / r["run_dir"]
        assert json.loads((run / "model_summary.json").read_text())["data"]["source"] == "prepared"
        assert (run / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()


def test_sweep_refuses_a_bad_source_writing_nothing(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"method": "random", "metric": {"name": "val_loss", "goal": "minimize"},
                                    "parameters": {"lr": {"values": [1e-3]}}}))
    (tmp_path / "empty").mkdir()
    for backend in ("local", "population"):
        for bad, what in ((tmp_path / "missing.txt", "does not exist"), (tmp_path / "empty", "holds no files")):
            out = CliRunner().invoke(app, ["sweep", "--sweep_config", str(spec), "--data_path", str(bad),
                                           "--config", str(_config(tmp_path)), "--backend", backend,
                                           "--sweep_dir", str(tmp_path / "sw")])
            _refused(out, what)
            assert not (tmp_path / "sw").exists()


def _spy_population(monkeypatch) -> list:
    """Record the data find_lr_population is given (the CLI's path reads it)."""
    seen, real = [], lr_finder.find_lr_population

    def spy(config, data, *args, **kw):
        seen.append(data)
        return real(config, data, *args, **kw)

    monkeypatch.setattr(lr_finder, "find_lr_population", spy)
    return seen


def _find_lr(tmp_path: Path, data: Path, *extra: str):
    return CliRunner().invoke(app, ["find-lr", "--config", str(_config(tmp_path)), "--data_path", str(data),
                                    "--population", "2", "--num_steps", "5", "--min_lr", "1e-4", "--max_lr", "1e-2",
                                    *extra])


@pytest.mark.slow
def test_find_lr_population_on_a_prepared_directory_and_a_jsonl(tmp_path, text, base_run, monkeypatch):
    seen = _spy_population(monkeypatch)
    docs = split_docs(text, 8)
    prepared = write_prepared(tmp_path / "ds", docs, char_tokenizer_with_eot(text))
    out = _find_lr(tmp_path, prepared)
    assert out.exit_code == 0, out.output
    assert "Best LR:" in out.output and seen[-1].prepared
    np.testing.assert_array_equal(seen[-1].train.array()[:50],
                                  np.fromfile(prepared / "shard_00000.bin", np.uint16)[:50])

    # A JSONL without capitals, fine-tuning the base run: the base's tokenizer encodes the
    # documents (a char tokenizer trained on this text would number the letters from 'a' = its
    # first symbols, since no capital precedes them: other ids).
    lower = ["".join(c for c in d if not c.isupper()) for d in docs]
    out = _find_lr(tmp_path, _jsonl(tmp_path / "docs.jsonl", lower), "--init_from", str(base_run))
    assert out.exit_code == 0, out.output
    base_tok, data = load_tokenizer(base_run / "tokenizer.json"), seen[-1]
    assert data.tokenizer.to_str() == base_tok.to_str()
    want = base_tok.encode(lower[0]).ids
    np.testing.assert_array_equal(data.train.array()[:len(want)], want)
    assert char_tokenizer("".join(lower)).encode(lower[0]).ids != want  # the check can tell them apart


def test_find_lr_population_refuses_a_bad_source(tmp_path):
    _refused(_find_lr(tmp_path, tmp_path / "missing"), "does not exist")
    (tmp_path / "empty").mkdir()
    _refused(_find_lr(tmp_path, tmp_path / "empty"), "holds no files")


def _eval(run: Path, data: Path, *extra: str) -> dict:
    out = CliRunner().invoke(app, ["eval", str(run), "--data_path", str(data), "--json", *extra])
    assert out.exit_code == 0, out.output
    return json.loads(out.output.strip().splitlines()[-1])


@pytest.mark.slow
def test_eval_on_a_prepared_directory_equals_eval_on_its_text(tmp_path, text, base_run):
    poems = tmp_path / "held_out.txt"
    poems.write_text(text[-6000:], encoding="utf-8")  # characters the run's tokenizer knows
    prepared = prepare_dataset(poems, tmp_path / "ds", tokenizer=base_run / "tokenizer.json", progress=False)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text(text[-6000:], encoding="utf-8")
    for extra in ((), ("--batches", "3")):
        want = _eval(base_run, poems, *extra)
        for source in (prepared, folder):
            got = _eval(base_run, source, *extra)
            # The same token ids (the run's char tokenizer has no end-of-text token, so the one
            # document is its text's ids) cut into the same windows through the same compiled
            # forward and summed in the same order: equal, not merely close. Characters and
            # bytes: counted per token, the text's own counts.
            assert got == want, (source, got, want)
    assert want["n_tokens"] == 3 * 8 * 16


@pytest.mark.slow
def test_eval_refuses_a_bad_source(tmp_path, base_run, text):
    other = write_prepared(tmp_path / "other", split_docs(text, 4), char_tokenizer_with_eot(text + "\u00e9"))
    out = CliRunner().invoke(app, ["eval", str(base_run), "--data_path", str(other)])
    _refused(out, "tokenized with")
    out = CliRunner().invoke(app, ["eval", str(base_run), "--data_path", str(tmp_path / "missing")])
    _refused(out, "does not exist")
