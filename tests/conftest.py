"""Shared fixtures: tiny configs (tests use tiny models) and the shared corpora."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from dantinox_eqx.config import Config  # noqa: E402
from dantinox_eqx.hostmem import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as the CLI and Trainer do: faster XLA:CPU steps in the tests too

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
WAR_AND_PEACE = SHARED_DATA / "war_and_peace.txt"

TINY = dict(dim=32, n_heads=4, head_size=8, num_blocks=2, vocab_size=37, max_context=16,
            batch_size=4, expansion=2, lr=3e-3, warmup_steps=5, max_steps=20, eval_interval=10,
            eval_iters=2)


def one_batch_losses(cfg: Config, steps: int = 40, alpha_balance: float = 0.0) -> list[float]:
    """The loss of every step of training `cfg`'s model (key 0) with `cfg`'s optimizer on ONE
    fixed random batch of 8 x 17 tokens (vocabulary 37): a model that learns fits it."""
    import equinox as eqx
    import jax

    from dantinox_eqx.model import Transformer
    from dantinox_eqx.optim import make_optimizer
    from dantinox_eqx.step import init_opt_state, make_train_step

    params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    opt = make_optimizer(cfg, steps)
    state = init_opt_state(opt, params)
    step = make_train_step(static, opt, alpha_balance=alpha_balance)
    batch = jax.random.randint(jax.random.key(1), (1, 8, 17), 0, 37)
    losses = []
    for i in range(steps):
        params, state, m = step(params, state, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    return losses


def decode_in_pieces(model, tokens, prefill: int):
    """Logits (B, T, V) of `tokens` (B, T) through the KV cache: a prefill of the first `prefill`
    tokens, then one token per call (to compare with the full forward)."""
    import jax.numpy as jnp

    B, T = tokens.shape
    cache = model.init_cache(B)
    out, cache = model.decode(tokens[:, :prefill], jnp.broadcast_to(jnp.arange(prefill), (B, prefill)), cache)
    pieces = [out]
    for t in range(prefill, T):
        o, cache = model.decode(tokens[:, t:t + 1], jnp.full((B, 1), t), cache)
        pieces.append(o)
    return jnp.concatenate(pieces, 1)


@pytest.fixture
def tiny_config() -> Config:
    return Config(**TINY)


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared corpus not found at {SHAKESPEARE}")
    return SHAKESPEARE


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """A 20 kB slice of tiny Shakespeare in a writable folder (for the token cache)."""
    p = tmp_path / "corpus.txt"
    p.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return p
