"""`train --data_path` on any source `prepare` takes (issue 14, item 3): a .jsonl file, a folder,
a text file over RAW_TEXT_BYTES are prepared into the cache on first use (data/cached.py),
reused while unchanged, prepared again when changed; training on them equals training on the
same source prepared by hand; bad sources exit 2 naming data_path before anything is written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli.main import app
from click.testing import CliRunner

from dantinox_eqx.data import cached
from dantinox_eqx.data.prepare import prepare_dataset, read_index
from dantinox_eqx.train.trainer import Trainer, read_log

from .conftest import plays_text
from .test_trainer import EXACT, tiny


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("DANTINOX_EQX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def _docs(n: int = 20, size: int = 2500) -> list[str]:
    text = plays_text()
    return [text[i * size:(i + 1) * size] for i in range(n)]


def _rows(run: Path) -> list[dict]:
    return [{k: r[k] for k in EXACT} for r in read_log(run / "training_log.csv")]


def _prepared(cache: Path) -> list[Path]:
    return sorted(p.parent for p in (cache / "prepared").glob("*/*/index.json"))


def _shards(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.glob("shard_*.bin"))}


@pytest.mark.slow
def test_a_jsonl_source_trains_as_its_prepared_dataset_and_the_cache_is_reused(tmp_path: Path, cache: Path):
    source = _jsonl(tmp_path / "docs.jsonl", _docs())
    config = tiny(max_steps=6, eval_interval=3)
    by_hand = prepare_dataset(source, tmp_path / "by_hand", progress=False)
    want = _rows(Trainer(config, progress=False).fit(by_hand, run_dir=tmp_path / "a"))

    run = Trainer(config, progress=False).fit(source, run_dir=tmp_path / "b")
    assert _rows(run) == want  # the same tokens, the same training (timings aside)
    [folder] = _prepared(cache)
    assert folder.name == "char" and folder.parent.name.startswith("docs.jsonl.")
    shards = _shards(folder)
    assert {k: v[0] for k, v in shards.items()} == {k: v[0] for k, v in _shards(by_hand).items()}

    # a second run and a resume (the run's own tokenizer) reuse it: nothing is prepared again
    Trainer(tiny(max_steps=3, eval_interval=3), progress=False).fit(source, run_dir=tmp_path / "c")
    Trainer(tiny(max_steps=9, eval_interval=3), progress=False).fit(None, run_dir=run, resume=True)
    assert _prepared(cache) == [folder] and _shards(folder) == shards
    assert [r["step"] for r in read_log(run / "training_log.csv")] == [3, 6, 9]

    # the source changed: prepared again, in the same place
    _jsonl(source, _docs(25))
    Trainer(config, progress=False).fit(source, run_dir=tmp_path / "d")
    index = json.loads((folder / "index.json").read_text())
    assert _prepared(cache) == [folder] and index["total_documents"] == 25


@pytest.mark.slow
def test_a_folder_and_a_large_text_file_are_prepared_on_first_use(tmp_path: Path, cache: Path, monkeypatch):
    docs = _docs(6)
    (tmp_path / "texts").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "texts" / f"{i}.txt").write_text(d, encoding="utf-8")
    run = Trainer(tiny(max_steps=2, eval_interval=2), progress=False).fit(tmp_path / "texts", run_dir=tmp_path / "a")
    summary = json.loads((run / "model_summary.json").read_text())["data"]
    # every character plus one end-of-text token per document
    assert summary["feed"] == "host" and summary["train_tokens"] + summary["val_tokens"] == sum(map(len, docs)) + 6

    big = tmp_path / "big.txt"
    big.write_text("".join(docs), encoding="utf-8")
    small = Trainer(tiny(max_steps=2, eval_interval=2), progress=False).fit(big, run_dir=tmp_path / "small")
    assert json.loads((small / "model_summary.json").read_text())["data"]["feed"] == "fused"  # encoded whole
    assert len(_prepared(cache)) == 1
    monkeypatch.setattr(cached, "RAW_TEXT_BYTES", big.stat().st_size - 1)
    run = Trainer(tiny(max_steps=2, eval_interval=2), progress=False).fit(big, run_dir=tmp_path / "b")
    summary = json.loads((run / "model_summary.json").read_text())["data"]
    assert summary["feed"] == "host" and summary["train_tokens"] + summary["val_tokens"] == len("".join(docs)) + 1
    assert len(_prepared(cache)) == 2


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "empty").mkdir() or d / "empty", r"^Error: data_path: the folder '.*empty' holds no files"),
    (lambda d: _bad_jsonl(d / "bad.jsonl"), r"^Error: data_path: .*bad\.jsonl:2 is not a JSON object"),
])
def test_bad_sources_exit_2_naming_data_path_before_writing(tmp_path: Path, cache: Path, make, message):
    source = make(tmp_path)
    out = CliRunner().invoke(app, ["train", "--data_path", str(source), "--run_dir", str(tmp_path / "run"),
                                   "--max_steps", "1"])
    assert out.exit_code == 2, out.output
    errors = [line for line in out.output.splitlines() if line.startswith("Error:")]  # main() prints only it
    assert len(errors) == 1 and re.search(message, errors[0]) and "Traceback" not in out.output, out.output
    assert not (tmp_path / "run").exists() and not (cache / "prepared").exists()


def _bad_jsonl(path: Path) -> Path:
    path.write_text(json.dumps({"text": "good"}) + "\n{not json\n", encoding="utf-8")
    return path


# Started twice at once on the same source: the spy records, under the lock, whether the
# dataset was already prepared when this process got the lock, and when it entered and left.
_PREPARER = r"""
import json, os, sys, time
from pathlib import Path
from dantinox_eqx.config import Config
from dantinox_eqx.data import cached
from dantinox_eqx.data.prepare import is_prepared

source, cache_root, barrier, me, out = sys.argv[1:6]
real, log = cached._prepare, {}

def spy(src, dest, options):
    log["entered"], log["found_prepared"] = time.time(), is_prepared(dest)
    if not log["found_prepared"]:
        time.sleep(1.0)  # the lock held long enough that the other process is surely waiting on it
    result = real(src, dest, options)
    log["left"] = time.time()
    return result

cached._prepare = spy
Path(barrier, me).touch()
while len(os.listdir(barrier)) < 2:  # both started: neither has reached the cache yet
    time.sleep(0.001)
log["called"] = time.time()
log["path"] = str(cached.prepared_source(source, cache_root, Config(), progress=False))
Path(out).write_text(json.dumps(log))
"""


@pytest.mark.slow
def test_two_processes_preparing_one_source_at_once_prepare_it_once(tmp_path: Path):
    """The cross-process lock of data/cached.py: two preparers started together (a barrier
    file each, so both call prepared_source within milliseconds of each other) on one source:
    one prepares it, the other waits for the lock and reuses the finished dataset; the cache
    holds one complete dataset (one set of shards, the bytes `prepare` writes by hand)."""
    source = _jsonl(tmp_path / "docs.jsonl", _docs())
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARER, str(source), str(tmp_path / "cache"), str(barrier),
                               str(i), str(tmp_path / f"log{i}.json")], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    first, second = sorted((json.loads((tmp_path / f"log{i}.json").read_text()) for i in range(2)),
                           key=lambda log: log["entered"])
    assert not first["found_prepared"] and second["found_prepared"]  # one prepared, one reused
    assert second["called"] < first["left"] <= second["entered"]  # they overlapped; the second waited
    assert first["path"] == second["path"]
    [folder] = _prepared(tmp_path / "cache")
    assert str(folder) == first["path"] and read_index(folder)["total_tokens"] > 0
    by_hand = prepare_dataset(source, tmp_path / "by_hand", progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in by_hand.iterdir())  # nothing else
    assert [s["file"] for s in read_index(folder)["shards"]] == list(_shards(folder))  # exactly one set of shards
    assert {k: v[0] for k, v in _shards(folder).items()} == {k: v[0] for k, v in _shards(by_hand).items()}
