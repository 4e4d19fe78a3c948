"""Seconds to the first step (issue 16): the model built in one program, the CLI's persistent
compilation cache, and no heavy import on the paths that do not need it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

from dantinox_eqx import compile_cache
from dantinox_eqx.config import Config
from dantinox_eqx.model import Transformer

from .conftest import TINY

EXE = Path(sys.executable).parent / "dantinox-eqx"


def _env(**extra: str) -> dict[str, str]:
    # The CLI's own cache rules, not the test session's: nox sets JAX's cache folder and a 0.1 s
    # minimum compile time, under which a program compiled fast in one run and slowly in the
    # next would be cached only by the second.
    drop = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", compile_cache.ENV)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu", **extra}


@pytest.mark.parametrize("kw", [{}, {"use_moe": True, "weight_tying": False},
                                {"absolute_pos": True, "trainable_pos": True, "qk_norm": True}])
@pytest.mark.slow
def test_build_in_one_program_equals_the_eager_constructor_bitwise(kw):
    cfg = Config(**{**TINY, **kw})
    eager, built = Transformer(cfg, key=jax.random.key(5)), Transformer.build(cfg, key=jax.random.key(5))
    assert jax.tree.structure(eager) == jax.tree.structure(built)
    for a, b in zip(jax.tree.leaves(eqx.filter(eager, eqx.is_array)), jax.tree.leaves(eqx.filter(built, eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compile_cache_folder_rules(monkeypatch, tmp_path):
    for name in ("JAX_COMPILATION_CACHE_DIR", compile_cache.ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DANTINOX_EQX_CACHE", str(tmp_path / "cache"))
    assert compile_cache.compile_cache_dir() == tmp_path / "cache" / "jax-cache"  # the user's cache folder
    assert compile_cache.compile_cache_dir(enabled=False) is None  # --no-compile-cache
    for off in ("0", "off", "False"):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.compile_cache_dir() is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "elsewhere"))
    assert compile_cache.compile_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax-own"))
    assert compile_cache.compile_cache_dir() is None  # JAX's own setting wins, untouched


def test_enable_compile_cache_sets_jax_config_when_jax_is_imported(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    old = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        assert compile_cache.enable_compile_cache() == tmp_path / "c"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    finally:
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


HEAVY = ("jax", "equinox", "orbax", "wandb", "optuna", "matplotlib", "rich", "tokenizers")
IMPORTS = """
import sys
from click.testing import CliRunner
from cli.main import app
out = CliRunner().invoke(app, ["--help"])
assert out.exit_code == 0 and "train" in out.output and "sweep" in out.output, out.output
print("help:", sorted(m for m in {heavy} if m in sys.modules))
import dantinox_eqx.train.trainer
print("trainer:", sorted(m for m in {heavy} if m in sys.modules))
"""


@pytest.mark.slow
def test_help_imports_nothing_heavy_and_training_no_optional_module():
    proc = subprocess.run([sys.executable, "-c", IMPORTS.format(heavy=HEAVY)], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["help"] == "[]"  # --help lists every command without JAX
    # training needs JAX, Equinox, orbax (checkpoints) and tokenizers; W&B, optuna, matplotlib
    # and rich (the progress bar, a terminal only) load when used
    assert lines["trainer"] == str(sorted(["equinox", "jax", "orbax", "tokenizers"]))


@pytest.mark.slow
def test_cli_fills_the_compile_cache_and_reuses_it(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be that is the question " * 400, encoding="utf-8")
    cache = tmp_path / "jax-cache"
    env = _env(**{compile_cache.ENV: str(cache), "DANTINOX_EQX_CACHE": str(tmp_path / "tokens"),
                  "JAX_LOG_COMPILES": "1"})
    run = [str(EXE), "train", "--data_path", str(corpus), "--dim", "32", "--n_heads", "2", "--head_size", "16",
           "--num_blocks", "2", "--max_context", "16", "--batch_size", "4", "--max_steps", "1", "--eval_iters", "2"]
    first = subprocess.run([*run, "--run_dir", str(tmp_path / "a")], env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    entries = {p.name for p in cache.iterdir()}
    assert any(name.startswith("jit_train_step") for name in entries)
    assert any(name.startswith("jit__lambda") for name in entries)  # Transformer.build's one program
    second = subprocess.run([*run, "--run_dir", str(tmp_path / "b")], env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Persistent compilation cache hit for 'jit_train_step'" in second.stderr
    assert {p.name for p in cache.iterdir()} == entries  # nothing new to compile
    off = subprocess.run([str(EXE), "--no-compile-cache", *run[1:], "--run_dir", str(tmp_path / "c")],
                         env={**env, compile_cache.ENV: str(tmp_path / "unused")}, capture_output=True, text=True,
                         timeout=600)
    assert off.returncode == 0, off.stderr[-3000:]
    assert not (tmp_path / "unused").exists() and "Persistent compilation cache hit" not in off.stderr
