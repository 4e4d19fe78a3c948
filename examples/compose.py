"""Train a tiny character model with the pure pieces only: no Trainer, no CLI.

    python examples/compose.py path/to/corpus.txt
"""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp

from dantinox_eqx import Config, Transformer
from dantinox_eqx.data.sampling import prepare_data, sample_batch
from dantinox_eqx.hostmem import keep_freed_memory
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, make_eval_step, make_train_step


def main(corpus: str, steps: int = 300) -> None:
    keep_freed_memory()  # CPU: reuse XLA's step buffers instead of re-faulting them (hostmem.py)
    config = Config(dim=64, n_heads=4, head_size=16, num_blocks=2, max_context=32, batch_size=16,
                    lr=3e-3, warmup_steps=20, max_steps=steps)
    data = prepare_data(corpus, tokenizer_type="char", max_context=config.max_context)
    config = config.replace(vocab_size=data.vocab_size)
    params, static = eqx.partition(Transformer(config, key=jax.random.key(0)), eqx.is_array)
    optimizer = make_optimizer(config, steps)
    opt_state = init_opt_state(optimizer, params)
    train_step, eval_step = make_train_step(static, optimizer), make_eval_step(static)
    train, val = jnp.asarray(data.train), jnp.asarray(data.val)
    data_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    for step in range(steps):
        batch = sample_batch(train, jax.random.fold_in(data_key, step), config.batch_size, config.max_context)
        params, opt_state, metrics = train_step(params, opt_state, batch, jax.random.fold_in(dropout_key, step))
        if step % 100 == 0 or step == steps - 1:
            val_batches = sample_batch(val, jax.random.key(step), config.batch_size, config.max_context, accum=4)
            val_loss = float(eval_step(params, val_batches)["loss"])
            print(f"step {step}: train {float(metrics['loss']):.3f} val {val_loss:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
