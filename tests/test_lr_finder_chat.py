"""find-lr on masked batches (issue 23 item 3): chat data and document_mask feed the range test,
single-run and --population, the batches and masked loss training uses."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer

from dantinox_eqx.config import Config
from dantinox_eqx.data import feeds
from dantinox_eqx.data.tokens import TRAIN_STREAM, open_splits
from dantinox_eqx.model import Transformer
from dantinox_eqx.train import lr_finder
from dantinox_eqx.train.programs import run_keys
from dantinox_eqx.train.step import document_flags, loss_fn, masked_sums

from .chat_fixtures import CHATML
from .conftest import TINY, plays_slice
from .prepared import EOT, char_tokenizer_with_eot, split_docs, write_prepared
from .test_chat_train import chat_files

# The first step's loss is the forward of the same batch and weights inside the step's jitted
# value_and_grad (another XLA fusion of the same float32 ops; under --population also vmapped,
# whose batched matmuls may accumulate in another order): a few float32 ulps (1.2e-7 each) of
# a loss ~5.7; 1e-6 relative is ~8 ulps. The gap to the unmasked loss asserted is 100x that.
REL = 1e-6


def _masked_loss(model: Transformer, tokens, flags) -> float:
    """Training's masked loss of a (accum, batch, W) batch: the trained tokens' summed
    cross-entropy over every micro-batch / their count (train/step.py)."""
    sums = [masked_sums(model, (jnp.asarray(t), jnp.asarray(f))) for t, f in zip(tokens, flags)]
    return float(sum(s[0] for s in sums) / sum(s[1] for s in sums))


def _plain_loss(model: Transformer, tokens) -> float:
    return float(np.mean([loss_fn(model, jnp.asarray(t))[1]["loss"] for t in tokens]))


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lr_chat")
    data, tok_file, _ = chat_files(folder / "in", n=40)
    tok = Tokenizer.from_file(str(tok_file))
    config = Config(**{**TINY, "vocab_size": tok.get_vocab_size(), "max_context": 256, "batch_size": 2,
                       "grad_accum": 2})
    splits = open_splits(data, config, tok, "tok", cache_dir=folder / "cache", chat_template=CHATML)
    return config, splits, Transformer(config, key=jax.random.key(5))


@pytest.mark.slow
def test_find_lr_on_chat_data_starts_at_the_masked_loss_of_its_first_batch(chat):
    config, splits, model = chat
    data_key = jax.random.split(jax.random.key(config.seed), 3)[1]  # find_lr's data key
    tokens, flags = lr_finder.batches(config, splits, data_key)(0)
    # the batch is the packed feed's (the bins PackedFeed draws for step 0 with that key)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    want = feeds.PackedFeed(splits, config, mesh, data_key, data_key).batch_at(0)
    np.testing.assert_array_equal(tokens, want[0])
    np.testing.assert_array_equal(flags, want[1])
    _, _, losses = lr_finder.find_lr(config, splits, 1e-4, 1e-2, 5, smoothing=0.0, model=model)
    masked = _masked_loss(model, tokens, flags)
    print(f"chat find-lr first loss {losses[0]!r}, masked {masked!r}, plain {_plain_loss(model, tokens)!r}")
    assert losses[0] == pytest.approx(masked, rel=REL), (losses[0], masked)
    assert abs(_plain_loss(model, tokens) - masked) > 100 * REL * masked


@pytest.mark.slow
def test_find_lr_population_on_chat_data_starts_at_the_masked_loss(chat):
    config, splits, model = chat
    result = lr_finder.find_lr_population(config, splits, 1e-4, 1e-2, population=2, num_steps=5, smoothing=0.0,
                                          model=model)
    key = feeds.philox_key(run_keys(jax.random.key(config.seed))[1])  # fit's data key: members' feed
    tokens, flags = feeds.packed_batch(splits, "train", key, 0, TRAIN_STREAM, (config.grad_accum, config.batch_size))
    masked = _masked_loss(model, tokens, flags)
    print(f"population first losses {[c[0] for c in result.curves]!r}, masked {masked!r}")
    for curve in result.curves:  # every member's first step: the same batch, the same weights
        assert curve[0] == pytest.approx(masked, rel=REL), (curve[0], masked)
    assert all(np.isfinite(result.val_loss))


@pytest.mark.slow
def test_find_lr_with_document_mask_starts_at_the_document_masked_loss(tmp_path: Path):
    text = plays_slice(tmp_path / "corpus.txt", 20_000).read_text(encoding="utf-8")
    tok = char_tokenizer_with_eot(text)
    prepared = write_prepared(tmp_path / "ds", split_docs(text, 60), tok)  # documents of ~330 chars
    config = Config(**{**TINY, "vocab_size": tok.get_vocab_size(), "max_context": 64, "document_mask": True,
                       "grad_accum": 2})
    splits = open_splits(prepared, config)
    model = Transformer(config, key=jax.random.key(6))
    data_key = jax.random.split(jax.random.key(config.seed), 3)[1]
    tokens = lr_finder.batches(config, splits, data_key)(0)
    eot = tok.token_to_id(EOT)
    assert int((np.asarray(tokens) == eot).sum()) > 0  # the batch crosses document boundaries
    _, _, losses = lr_finder.find_lr(config, splits, 1e-4, 1e-2, 5, smoothing=0.0, model=model)
    masked = _masked_loss(model, tokens, document_flags(tokens, eot))
    print(f"document_mask find-lr first loss {losses[0]!r}, masked {masked!r}, plain {_plain_loss(model, tokens)!r}")
    assert losses[0] == pytest.approx(masked, rel=REL), (losses[0], masked)
    assert abs(_plain_loss(model, tokens) - masked) > 10 * REL * masked
