"""Evaluating on chat data (issue 23 item 3): `eval` scores the trained (answer) tokens only, with
the run's chat template and train_on, packed as training packs them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli.main import app
from click.testing import CliRunner

from dantinox_eqx.config import Config
from dantinox_eqx.data.chat_data import TRAINED, encode_example, parse_row, render_spans, special_tokens
from dantinox_eqx.data.chat_prepare import prepare_chat
from dantinox_eqx.model import Transformer
from dantinox_eqx.run.chat_template import write_chat_template

from .chat_fixtures import CHATML
from .conftest import TINY
from .runs import write_run
from .test_chat_train import _env, chat_files

# Float32 forwards of the same example, alone (the reference) and packed with others into a
# window (segment ids, positions restarted): the same products in other reduction orders
# (attention over more masked keys, other matmul blockings on AVX2 / AVX-512), so each
# token's loss (about ln 300 = 5.7 nats) may differ in its last few float32 bits (eps 6e-8,
# about 1e-6 absolute per token); the eval also sums each batch's losses in float32 (relative
# rounding ~ sqrt(n) * eps for n <= 4 * 256 terms, 2e-6). 1e-5 relative bounds both with room,
# and is 1000x below the gap between the answer-token and the all-token losses asserted.
RTOL = 1e-5


def _direct(model: Transformer, tok, data: Path, train_on: str) -> tuple[float, int, int, float, int]:
    """(summed nats of the trained targets, their count, trained UTF-8 bytes, summed nats of
    every target, every target's count): each example alone through the model's plain causal
    forward, float32 logits, summed in float64 on the host."""
    special = special_tokens(tok)
    template = CHATML
    nats = count = n_bytes = all_nats = all_count = 0
    forward = eqx.filter_jit(lambda m, x: m(x)[0])
    for i, line in enumerate(data.read_text().splitlines()):
        text, spans = render_spans(parse_row(line, f"line {i}"), template, f"line {i}", special)
        ids, flags, trained_bytes = encode_example(tok, text, spans, train_on, f"line {i}")
        padded = np.zeros(model.max_context, np.int32)  # one compiled shape; causal: padding changes nothing before
        padded[:len(ids) - 1] = ids[:-1]
        logits = np.asarray(forward(model, padded[None]), np.float32)[0, :len(ids) - 1]
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
        nll = -logp[np.arange(len(ids) - 1), ids[1:]]
        trained = (flags[1:] & TRAINED) > 0
        nats, count, n_bytes = nats + nll[trained].sum(), count + int(trained.sum()), n_bytes + trained_bytes
        all_nats, all_count = all_nats + nll.sum(), all_count + len(nll)
    return nats, count, n_bytes, all_nats, all_count


def _eval(run: Path, data: Path, *extra: str) -> dict:
    out = CliRunner().invoke(app, ["eval", str(run), "--data_path", str(data), "--json", *extra])
    assert out.exit_code == 0, out.output
    return json.loads(out.output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> tuple[Path, Path, Transformer]:
    """A run of a tiny random model with the chat tokenizer and ChatML, and 24 conversations."""
    folder = tmp_path_factory.mktemp("chat_eval")
    data, tok_file, _ = chat_files(folder / "in", n=24)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_file))
    config = Config(**{**TINY, "vocab_size": tok.get_vocab_size(), "max_context": 256})  # no example is cut
    model = Transformer(config, key=jax.random.key(3))
    run = write_run(folder / "run", config, tok, eqx.filter(model, eqx.is_array), 1)
    write_chat_template(run, CHATML)
    return run, data, model


@pytest.mark.slow
def test_eval_on_chat_data_scores_the_answer_tokens_only(tmp_path, monkeypatch, chat_run):
    from tokenizers import Tokenizer

    monkeypatch.setenv("DANTINOX_EQX_CACHE", str(tmp_path / "cache"))
    run, data, model = chat_run
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    nats, count, n_bytes, all_nats, all_count = _direct(model, tok, data, "assistant")
    got = _eval(run, data, "--batch_size", "4")
    assert got["scored"] == "chat" and got["mode"] == "all"
    assert got["n_tokens"] == count  # every answer token (and <|im_end|>) scored once, nothing else
    assert got["loss"] == pytest.approx(nats / count, rel=RTOL), (got, nats / count)
    # bits per byte over the answers' own bytes (the prepared dataset's trained bytes)
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=RTOL)
    assert abs(got["loss"] - all_nats / all_count) > 1000 * RTOL * got["loss"], (got["loss"], all_nats / all_count)
    # a prepared chat directory (made with the run's template and train_on) scores the same
    prepared = prepare_chat(data, tmp_path / "prepared", tok, CHATML, "assistant")
    assert _eval(run, prepared, "--batch_size", "4") == got
    # random packed windows: a fixed seed gives the same result, another seed another one
    a, b = _eval(run, data, "--batches", "2", "--seed", "1"), _eval(run, data, "--batches", "2", "--seed", "1")
    assert a == b and a["mode"] == "random" and a["n_windows"] == 16 and a["loss"] != got["loss"]


def test_eval_on_chat_data_follows_the_runs_train_on(tmp_path, monkeypatch, chat_run):
    from tokenizers import Tokenizer

    monkeypatch.setenv("DANTINOX_EQX_CACHE", str(tmp_path / "cache"))
    run, data, model = chat_run
    all_run = tmp_path / "all"  # the same model, trained (in its config) with train_on: all
    all_run.mkdir()
    for f in run.iterdir():
        (all_run / f.name).symlink_to(f)
    (all_run / "config.yaml").unlink()
    Config.from_yaml(run / "config.yaml").replace(train_on="all").to_yaml(all_run / "config.yaml")
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    _, _, _, all_nats, all_count = _direct(model, tok, data, "all")
    got = _eval(all_run, data, "--batch_size", "4")
    assert got["n_tokens"] == all_count  # every target of every example (its first token has none)
    assert got["loss"] == pytest.approx(all_nats / all_count, rel=RTOL)


def test_eval_of_chat_data_without_a_template_is_one_line_exit_2(tmp_path, monkeypatch, chat_run):
    monkeypatch.setenv("DANTINOX_EQX_CACHE", str(tmp_path / "cache"))
    run, data, _ = chat_run
    bare = tmp_path / "bare"  # the run without its chat_template.jinja
    bare.mkdir()
    for f in run.iterdir():
        if f.name != "chat_template.jinja":
            (bare / f.name).symlink_to(f)
    exe = Path(sys.executable).parent / "dantinox-eqx"
    proc = subprocess.run([str(exe), "eval", str(bare), "--data_path", str(data)], env=_env(tmp_path / "cache"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "line 2: a conversation needs a chat template" in proc.stderr
    assert not (tmp_path / "cache" / "prepared").exists() or not any((tmp_path / "cache" / "prepared").iterdir())
    template = tmp_path / "t.jinja"
    template.write_text(CHATML, encoding="utf-8")
    with_file = _eval(bare, data, "--batch_size", "4", "--chat_template", str(template))
    assert with_file == _eval(run, data, "--batch_size", "4")


@pytest.mark.slow
def test_eval_with_document_mask_scores_each_document_alone():
    """A run trained with document_mask: eval cuts the windows into documents as training does:
    the separator is scored (it ends its document), the first token after it is not, and no
    token attends across it. Three documents in one window equal each document alone."""
    from dantinox_eqx.infer.evaluate import evaluate_tokens

    from .conftest import plays_text
    from .prepared import EOT, char_tokenizer_with_eot

    docs = [d for d in plays_text()[:3000].split("\n\n") if len(d) > 10][:3]
    tok = char_tokenizer_with_eot("".join(docs))
    eot = tok.token_to_id(EOT)
    pieces = [[tok.token_to_id(c) for c in d] + [eot] for d in docs]
    ids = np.concatenate(pieces)
    config = Config(**{**TINY, "vocab_size": tok.get_vocab_size(), "max_context": 256})
    model = Transformer(config, key=jax.random.key(4))
    assert len(ids) - 1 <= 256  # one window (the last separator is dropped: the end of the text)
    nats = count = 0
    for piece in pieces[:-1] + [pieces[-1][:-1]]:
        logits = np.asarray(model(jnp.asarray(piece[:-1], jnp.int32)[None])[0], np.float32)[0]
        nll = -np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)[np.arange(len(piece) - 1), piece[1:]]
        nats, count = nats + nll.sum(), count + len(nll)
    got = evaluate_tokens(model, tok, ids, batch_size=1, document_mask=True)
    assert got.scored == "documents" and got.n_tokens == count  # two separators scored, three first tokens not
    assert got.loss == pytest.approx(nats / count, rel=RTOL)  # RTOL: the same reasoning, 1 x 256 terms
    plain = evaluate_tokens(model, tok, ids, batch_size=1)  # separators unscored, attention across them
    # a random model's losses differ little (measured 7.6e-4 relative), yet 76x the tolerance
    assert abs(plain.loss - got.loss) > 10 * RTOL * got.loss


def test_a_separate_chat_validation_set_is_rendered_and_masked_as_training(tmp_path):
    """`val_path` for chat training data: a chat JSONL rendered with the run's template and
    train_on into the same token / flag streams as the training data; all training rows train."""
    from tokenizers import Tokenizer

    from dantinox_eqx.data.sampling import DataError
    from dantinox_eqx.data.tokens import open_splits

    data, tok_file, template = chat_files(tmp_path / "in", n=30)
    rows = data.read_text().splitlines(keepends=True)
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(rows[:20]), encoding="utf-8")
    val.write_text("".join(rows[20:]), encoding="utf-8")
    tok = Tokenizer.from_file(str(tok_file))
    config = Config(**{**TINY, "vocab_size": None, "max_context": 256, "val_path": str(val)})
    splits = open_splits(train, config, tok, "tok", cache_dir=tmp_path / "cache", chat_template=CHATML)
    want = [encode_example(tok, *render_spans(parse_row(r, "v"), CHATML, "v", special_tokens(tok)), "assistant", "v")
            for r in rows[20:]]
    assert np.array_equal(splits.val.array(), np.concatenate([w[0] for w in want]))
    assert np.array_equal(splits.val_flags.array(), np.concatenate([w[1] for w in want]))
    assert splits.chat["train_packing"]["examples"] == 20 and splits.chat["val_packing"]["examples"] == 10
    assert splits.val.tokens_per_byte == sum(int((w[1] & TRAINED).sum()) for w in want) / sum(w[2] for w in want)
    # the same validation set prepared beforehand serves too; with another train_on it is refused
    prepared = prepare_chat(val, tmp_path / "val_ds", tok, CHATML, "assistant")
    again = open_splits(train, config.replace(val_path=str(prepared)), tok, "tok", cache_dir=tmp_path / "cache",
                        chat_template=CHATML)
    assert np.array_equal(again.val.array(), splits.val.array())
    other = prepare_chat(val, tmp_path / "val_all", tok, CHATML, "all")
    refusals = [(config.replace(val_path=str(other)), train, "val_path: .* another train_on"),
                (config.replace(val_path=str(tmp_path / "in" / "tokenizer.json")), train, "val_path: .* not chat"),
                (config, rows_as_text(tmp_path, rows), "val_path: chat data .* validates chat training data only")]
    for cfg, source, message in refusals:
        with pytest.raises(DataError, match=message):
            open_splits(source, cfg, tok, "tok", cache_dir=tmp_path / "cache", chat_template=CHATML)


def rows_as_text(tmp_path: Path, rows: list[str]) -> Path:
    text = tmp_path / "plain.txt"
    text.write_text("".join(json.loads(r).get("prompt", "x") * 20 for r in rows), encoding="utf-8")
    return text


@pytest.mark.slow
def test_training_with_a_chat_validation_set(tmp_path, monkeypatch):
    """`train` with val_path on chat data: the validation loss is over the separate set's packed
    answers; every training row trains."""
    from dantinox_eqx.train.trainer import Trainer, read_log

    from .test_chat_train import chat_config

    monkeypatch.setenv("DANTINOX_EQX_CACHE", str(tmp_path / "cache"))
    data, tok, template = chat_files(tmp_path / "in", n=40)
    rows = data.read_text().splitlines(keepends=True)
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(rows[:30]), encoding="utf-8")
    val.write_text("".join(rows[30:]), encoding="utf-8")
    config = chat_config(tok, template, max_steps=4, eval_interval=2, val_path=str(val), max_context=256)
    out = Trainer(config, progress=False).fit(train, run_dir=tmp_path / "run")
    chat = json.loads((out / "model_summary.json").read_text())["data"]["chat"]
    assert chat["train_packing"]["examples"] == 30 and chat["val_packing"]["examples"] == 10
    log = read_log(out / "training_log.csv")
    assert [r["step"] for r in log] == [2, 4] and all(math.isfinite(r["val_loss"]) for r in log)
    assert Config.from_yaml(out / "config.yaml").val_path == str(val.resolve())
