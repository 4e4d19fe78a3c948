"""Deep models train with per-layer arrays and save stacked ones (train/layer_layout.py, issue 25).

The per-layer step must compute what the scanned one computes (same losses, same weights), a
stopped run must resume exactly, checkpoints keep the stacked format, and a LoRA fine-tune of a
deep base saves the same adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

from dantinox_eqx.config import AUTO_UNROLL_MAX_BLOCKS, Config
from dantinox_eqx.lora import apply_lora, lora_trainable
from dantinox_eqx.model import Transformer, unstack_blocks
from dantinox_eqx.run import checkpoint as ckpt
from dantinox_eqx.train.layer_layout import (
    restack_blocks,
    restack_state,
    unstack_model,
    unstack_state,
    unstacked_training,
)
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.state import TrainState
from dantinox_eqx.train.step import init_opt_state, make_train_step
from dantinox_eqx.train.trainer import LOG_COLUMNS, Trainer, read_log

from .conftest import TINY
from .runs import StopRun, stop_at

DEEP = AUTO_UNROLL_MAX_BLOCKS + 2  # deeper than the auto rule unrolls: the per-layer step
EXACT = [c for c in LOG_COLUMNS if c not in ("ms_per_step", "tokens_per_s")]


def deep(**kw) -> Config:
    base = {**TINY, "dim": 16, "n_heads": 2, "head_size": 8, "num_blocks": DEEP, "vocab_size": None,
            "max_steps": 20, "eval_interval": 10, "eval_iters": 2, "warmup_steps": 5}
    return Config(**{**base, **kw})


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_the_rule():
    assert unstacked_training(deep())
    assert not unstacked_training(deep(num_blocks=AUTO_UNROLL_MAX_BLOCKS))  # unrolled scan already
    assert not unstacked_training(deep(scan_unroll=1))  # an explicit choice is kept
    assert not unstacked_training(deep(), backend="gpu")  # where the copies would cost device memory
    for other in ({"sharding": "fsdp"}, {"optimizer": "muon"}, {"optimizer": "adafactor"},
                  {"gradient_checkpointing": True}, {"use_moe": True}):
        assert not unstacked_training(deep(**other)), other


def test_state_round_trip_is_bitwise():
    model = apply_lora(Transformer(deep(vocab_size=37), key=jax.random.key(0)), "all", 2, 4.0, key=jax.random.key(1))
    trainable = lora_trainable(model)
    params = eqx.filter(model, eqx.is_array)
    opt = make_optimizer(deep(vocab_size=37), 20)
    state = TrainState.initial(params, init_opt_state(opt, params, trainable), key=jax.random.key(0))
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 1.5, state.opt_state))  # non-zero moments
    flat = unstack_state(state, DEEP)
    assert isinstance(flat.params.blocks, tuple) and len(flat.params.blocks) == DEEP
    mu = [x for x in jax.tree.leaves(flat.opt_state) if getattr(x, "ndim", 0) >= 1]
    assert all(x.shape[0] != DEEP or x.ndim == 1 for x in mu)  # no stacked moment left
    back = restack_state(flat)
    assert jax.tree.structure(back.params) == jax.tree.structure(state.params)
    assert jax.tree.structure(back.opt_state) == jax.tree.structure(state.opt_state)
    for a, b in zip(_leaves((back.params, back.opt_state)), _leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert restack_blocks(model) is model  # idempotent on the stacked form
    np.testing.assert_array_equal(restack_blocks(unstack_blocks(model)).blocks.mlp.up.weight,
                                  model.blocks.mlp.up.weight)


@pytest.mark.slow
def test_a_step_of_your_own_on_unstack_model_equals_the_stacked_one():
    """The pure-function path: `make_train_step` on `unstack_model`'s LoRA model and mask gives
    the stacked step's loss and, restacked, its weights."""
    cfg = deep(vocab_size=37)
    model = apply_lora(Transformer(cfg, key=jax.random.key(0)), "all", 2, 4.0, key=jax.random.key(1))
    batch = jax.random.randint(jax.random.key(2), (1, 4, 17), 0, 37)
    out = []
    for m, trainable in ((model, lora_trainable(model)), unstack_model(model, lora_trainable(model))):
        params, static = eqx.partition(m, eqx.is_array)
        opt = make_optimizer(cfg, 20)
        step = make_train_step(static, opt, trainable=trainable, donate=False)
        state = init_opt_state(opt, params, trainable)
        for i in range(2):
            params, state, metrics = step(params, state, batch, jax.random.key(i))
        out.append((float(metrics["loss"]), restack_blocks(eqx.combine(params, static))))
    (loss_a, a), (loss_b, b) = out
    assert isinstance(unstack_model(model)[0].blocks, tuple) and unstack_model(model)[1] is None
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for x, y in zip(_leaves(eqx.filter(b, eqx.is_array)), _leaves(eqx.filter(a, eqx.is_array))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def _rows(run: Path) -> list[dict]:
    return [{k: r[k] for k in EXACT} for r in read_log(run / "training_log.csv")]


def _checkpoint(run: Path, like) -> list[np.ndarray]:
    step, params, _ = ckpt.restore(run, ckpt.LATEST, like)
    return [step, *_leaves(params)]


@pytest.mark.slow
def test_per_layer_training_equals_the_scan_resumes_exactly_and_saves_stacked(tmp_path: Path, small_corpus: Path):
    per_layer = Trainer(deep(), progress=False).fit(small_corpus, run_dir=tmp_path / "per_layer")
    scanned = Trainer(deep(scan_unroll=1), progress=False).fit(small_corpus, run_dir=tmp_path / "scanned")
    cfg = Config.from_yaml(per_layer / "config.yaml")
    like = eqx.filter(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)  # the stacked form
    assert [json.loads((r / "model_summary.json").read_text())["layer_loop"] for r in (per_layer, scanned)] == \
        ["per_layer", "scan"]

    # Same arithmetic: the rows and the saved weights agree (float32 rounding of the summed
    # per-layer gradients aside).
    a, b = _rows(per_layer), _rows(scanned)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for k in ("train_loss", "val_loss"):
            np.testing.assert_allclose(ra[k], rb[k], rtol=1e-5)
    for x, y in zip(_checkpoint(per_layer, like)[1:], _checkpoint(scanned, like)[1:]):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)

    # Exact resume: stopped after step 10's checkpoint, continued: the uninterrupted run's rows
    # and checkpoint, bitwise.
    stopped = tmp_path / "stopped"
    with pytest.raises(StopRun):
        Trainer(deep(), loggers=[stop_at(10)], progress=False).fit(small_corpus, run_dir=stopped)
    assert ckpt.latest_step(stopped, ckpt.LATEST) == 10
    Trainer(deep(), progress=False).fit(small_corpus, run_dir=stopped, resume=True)
    assert _rows(stopped) == a
    for x, y in zip(_checkpoint(stopped, like), _checkpoint(per_layer, like)):
        np.testing.assert_array_equal(x, y)

    # A LoRA fine-tune of the deep base: the same adapters through either step.
    ft = dict(use_lora=True, lora_rank=2, lora_targets="all", init_from=str(per_layer), max_steps=10,
              eval_interval=10, lr=1e-2, warmup_steps=0)
    runs = [Trainer(cfg.replace(**ft, scan_unroll=unroll), progress=False).fit(small_corpus,
                                                                            run_dir=tmp_path / f"lora{unroll}")
            for unroll in (0, 1)]
    adapted = apply_lora(Transformer(cfg, key=jax.random.key(0)), "all", 2, 4.0, key=jax.random.key(1))
    lora_like = eqx.filter(adapted, lora_trainable(adapted))  # what an adapter-only run saves
    np.testing.assert_allclose(_rows(runs[0])[-1]["train_loss"], _rows(runs[1])[-1]["train_loss"], rtol=1e-5)
    for x, y in zip(_checkpoint(runs[0], lora_like)[1:], _checkpoint(runs[1], lora_like)[1:]):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
