"""`dantinox-eqx generate` and `dantinox-eqx eval` on a trained run, through the real executable."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dantinox_eqx.config import Config

from .conftest import TINY
from .runs import make_run

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / "dantinox-eqx"

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("cli_run")
    text = shakespeare.read_text(encoding="utf-8")
    (tmp / "corpus.txt").write_text(text[:20_000], encoding="utf-8")
    vocab = set(text[:20_000])
    (tmp / "held_out.txt").write_text("".join(c for c in text[40_000:42_000] if c in vocab), encoding="utf-8")
    return make_run(tmp / "run", tmp / "corpus.txt"), "".join(sorted(vocab))


def _assert_usage_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ")
    for needle in needles:
        assert needle in last, last


def test_generate_prints_text_from_the_vocabulary(trained):
    run, vocab = trained
    out = _cli("generate", run, "--prompt", "ROMEO:", "--max_new_tokens", 80, "--temperature", 0.8,
               "--top_k", 20, "--seed", 3)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 80 + 1  # + final newline
    assert set(text) <= set(vocab)
    streamed = _cli("generate", run, "--prompt", "ROMEO:", "--max_new_tokens", 80, "--temperature", 0.8,
                    "--top_k", 20, "--seed", 3, "--stream", "--latest")
    assert streamed.returncode == 0 and streamed.stdout == text  # best == latest in this run


def test_eval_reports_loss_perplexity_and_bits(trained):
    run, _ = trained
    out = _cli("eval", run, "--data_path", run.parent / "held_out.txt", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["mode"] == "all" and r["n_tokens"] == len((run.parent / "held_out.txt").read_text()) - 1
    assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-6)
    assert math.isclose(r["bits_per_char"], r["loss"] / math.log(2), rel_tol=1e-6)
    n_bytes = len((run.parent / "held_out.txt").read_bytes()) - 1  # after the first (one-byte) character
    assert r["n_bytes"] == n_bytes
    assert math.isclose(r["bits_per_byte"], r["loss"] / math.log(2) * r["n_tokens"] / n_bytes, rel_tol=1e-9)
    vocab_size = Config.from_yaml(run / "config.yaml").vocab_size
    assert r["loss"] < math.log(vocab_size) - 0.5  # trained: well below uniform guessing
    text = _cli("eval", run, "--data_path", run.parent / "held_out.txt", "--batches", 2)
    assert text.returncode == 0 and "random windows" in text.stdout and "bits/char" in text.stdout
    assert "bits/byte" in text.stdout


def test_missing_and_broken_run_dirs_exit_2(tmp_path, trained):
    run, _ = trained
    _assert_usage_error(_cli("generate", tmp_path / "missing", "--prompt", "hi"), "missing", "does not exist")
    no_ckpt = tmp_path / "no_ckpt"
    Config(**TINY).to_yaml(no_ckpt / "config.yaml")
    _assert_usage_error(_cli("generate", no_ckpt, "--prompt", "hi"), "no_ckpt", "tokenizer.json")
    (no_ckpt / "tokenizer.json").write_text((run / "tokenizer.json").read_text())
    _assert_usage_error(_cli("generate", no_ckpt, "--prompt", "hi"), "no_ckpt", "checkpoint")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.yaml").write_text("{{{ not yaml")
    _assert_usage_error(_cli("eval", garbage, "--data_path", run.parent / "held_out.txt"), "garbage")
    _assert_usage_error(_cli("generate", run, "--prompt", "\u2603"), "outside the char vocabulary")
    _assert_usage_error(_cli("eval", run, "--data_path", tmp_path / "nope.txt"), "nope.txt")
