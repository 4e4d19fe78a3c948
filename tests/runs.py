"""Build small trained run directories for tests, in the Trainer's on-disk format.

A stand-in for `Trainer(config).fit(corpus)` (issue 3) that writes exactly what loading and
sampling read: `config.yaml` (resolved, vocab_size filled), `tokenizer.json` and checkpoints
`best/<step>/params` and `latest/<step>/{params,train_state}`. Swap `make_run` for the real
Trainer once it lands; the tests only depend on the directory layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from tokenizers import Tokenizer

from dantinox_eqx.config import Config
from dantinox_eqx.data.sampling import prepare_data, sample_batch
from dantinox_eqx.data.tokenizer import save_tokenizer
from dantinox_eqx.model import Transformer, cast_floating
from dantinox_eqx.run import checkpoint
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, make_train_step

# A tiny char model: trains 100 steps in a few seconds on a contended CPU.
RUN_CONFIG = dict(dim=32, n_heads=4, head_size=8, num_blocks=2, max_context=32, batch_size=8,
                  expansion=2, lr=3e-3, warmup_steps=10, max_steps=100, eval_interval=50,
                  eval_iters=2, tokenizer_type="char")


def make_run(run_dir: Path, corpus: Path, steps: int = 100, **overrides) -> Path:
    """Train a tiny model on `corpus` for `steps` steps and write a run directory.

    `use_bf16=True` trains (and saves) bfloat16 parameters. Returns `run_dir`.
    """
    config = Config(**{**RUN_CONFIG, "max_steps": steps, **overrides})
    data = prepare_data(corpus, tokenizer_type=config.tokenizer_type, max_context=config.max_context,
                        val_fraction=config.val_fraction, bpe_vocab_size=config.bpe_vocab_size,
                        cache_dir=run_dir.parent)
    config = config.replace(vocab_size=data.vocab_size)
    model = Transformer(config, key=jax.random.key(config.seed))
    if config.use_bf16:
        model = cast_floating(model, jnp.bfloat16)
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = make_optimizer(config, steps)
    opt_state = init_opt_state(optimizer, params)
    step_fn = make_train_step(static, optimizer)
    train = jnp.asarray(data.train, jnp.int32)
    data_key, dropout_key = jax.random.split(jax.random.key(config.seed + 1))
    for s in range(steps):
        batch = sample_batch(train, jax.random.fold_in(data_key, s), config.batch_size, config.max_context)
        params, opt_state, _ = step_fn(params, opt_state, batch, jax.random.fold_in(dropout_key, s))

    train_state = {"opt_state": opt_state, "step": jnp.asarray(steps, jnp.int32)}
    return write_run(run_dir, config, data.tokenizer, params, steps, train_state)


def write_run(run_dir: Path, config: Config, tokenizer: Tokenizer, params: Any, step: int,
              train_state: Any = None) -> Path:
    """Write a run directory holding `params` (the arrays of a model) as both checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config.to_yaml(run_dir / "config.yaml")
    save_tokenizer(tokenizer, run_dir / "tokenizer.json")
    checkpoint.save(run_dir, checkpoint.BEST, step, params)
    checkpoint.save(run_dir, checkpoint.LATEST, step, params,
                    train_state if train_state is not None else {"step": jnp.asarray(step, jnp.int32)})
    return run_dir


class StopRun(Exception):
    """Raised by a `stop_at` logger: a test's interruption of `Trainer.fit`."""


def stop_at(step: int):
    """A Trainer logger that stops the run at the row of `step`, after that step's checkpoint was
    saved (loggers run last), as an interruption would."""
    def logger(row):
        if row["step"] == step:
            raise StopRun
    return logger
