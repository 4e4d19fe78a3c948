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
