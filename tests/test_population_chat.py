"""Population members on masked data (issue 23 item 3): on chat data (the packed feed) and with
document_mask, member k trains and logs what a separate `Trainer` run of its config does."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from dantinox_eqx.config import Config
from dantinox_eqx.data import feeds, tokens
from dantinox_eqx.train import population as pop
from dantinox_eqx.train.programs import run_keys
from dantinox_eqx.train.trainer import Trainer

from .chat_fixtures import CHATML
from .conftest import plays_slice
from .test_chat_train import chat_config, chat_files
from .test_population_prepared import BASE, MEMBERS, _assert_rows_close, separate_and_population_runs

# Log rows are compared within test_population_prepared's REL (1e-6 relative, its reasoning:
# the member's step is the separate run's under vmap, a few float32 ulps per step over 10 small
# steps). The masked loss adds one float32 division by the batch's trained-token count, the
# same in both.
CHAT = dict(max_steps=10, eval_interval=5, eval_iters=2, grad_accum=2, batch_size=2, dropout_rate=0.1,
            warmup_steps=2, lr=1e-3, n_devices=1, max_context=128)


def test_member_batches_are_the_packed_feeds(tmp_path):
    """On chat data MemberBatches' rows are, member by member, the (tokens, flags) PackedFeed places."""
    data, tok, template = chat_files(tmp_path / "in", n=40)
    config = chat_config(tok, template, **CHAT)
    splits = tokens.open_splits(data, config, feeds_tokenizer(tok), "tok", cache_dir=tmp_path / "cache",
                                chat_template=CHATML)
    assert feeds.choose_feed(splits) == "packed"
    keys = [run_keys(jax.random.key(s)) for s in (1, 2)]
    mesh = pop.population_mesh(1)
    batches = feeds.MemberBatches(splits, config, [k[1] for k in keys], [k[3] for k in keys])
    steps = np.asarray([3, 7])
    got, (ev_train, ev_val) = batches.train_batches(steps), batches.eval_batches(steps)
    for k, (_, data_key, _, eval_key) in enumerate(keys):
        alone = feeds.PackedFeed(splits, config, mesh, data_key, eval_key)
        want_train, want_val = alone.eval_args(int(steps[k]))
        for i in range(2):  # tokens, flags
            np.testing.assert_array_equal(got[i][k], np.asarray(alone.batch_at(int(steps[k]))[i]))
            np.testing.assert_array_equal(ev_train[i][k], np.asarray(want_train[i]))
            np.testing.assert_array_equal(ev_val[i][k], np.asarray(want_val[i]))
    assert not np.array_equal(got[0][0], got[0][1])
    window = config.batch_size * (config.max_context + 1) * 4  # int32 tokens and flags
    assert pop.data_bytes(config, splits) == (2 * (3 * config.grad_accum + 2 * config.eval_iters) * window, 0)


def feeds_tokenizer(path: Path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path))


@pytest.mark.slow
def test_members_on_chat_data_are_their_separate_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DANTINOX_EQX_CACHE", str(tmp_path / "cache"))
    data, tok, template = chat_files(tmp_path / "in", n=60)
    members, separate, results = separate_and_population_runs(chat_config(tok, template, **CHAT), data, tmp_path)
    assert [r.status for r in results] == ["complete"] * 2
    for m, s in zip(members, separate):
        summary, alone = (json.loads((d / "model_summary.json").read_text()) for d in (m, s))
        assert summary["data"] == alone["data"] and summary["data"]["feed"] == "packed"
        assert (m / "chat_template.jinja").read_text() == CHATML  # as fit keeps it


@pytest.mark.slow
def test_members_with_document_mask_are_their_separate_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DANTINOX_EQX_CACHE", str(tmp_path / "cache"))
    docs = tmp_path / "docs.jsonl"  # short documents: prepared with <|endoftext|> after each
    text = plays_slice(tmp_path / "corpus.txt", 30_000).read_text(encoding="utf-8")
    docs.write_text("".join(json.dumps({"text": s}) + "\n" for s in text.split("\n\n") if s), encoding="utf-8")
    base = Config(**{**BASE, "document_mask": True})
    _, separate, _ = separate_and_population_runs(base, docs, tmp_path)
    unmasked = Trainer(base.replace(**MEMBERS[0], document_mask=False), progress=False).fit(
        docs, run_dir=tmp_path / "plain")
    with pytest.raises(AssertionError):  # the masks change the numbers: the comparison can tell
        _assert_rows_close(unmasked, separate[0])
