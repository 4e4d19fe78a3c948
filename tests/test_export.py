"""Export: model.safetensors with the documented names, and self-contained run directories."""

import json
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from dantinox_eqx.config import Config, ConfigError
from dantinox_eqx.data.tokenizer import build_tokenizer, encode, load_tokenizer
from dantinox_eqx.lora import LoRALinear, apply_lora, merge_lora
from dantinox_eqx.model import Transformer
from dantinox_eqx.run import checkpoint
from dantinox_eqx.run.export import export_run, to_safetensors

from .conftest import TINY

TOKENS = jax.random.randint(jax.random.key(7), (2, 16), 0, 37)
TEXT = "abcdefghijklmnopqrstuvwxyz0123456789 "  # 37 characters: TINY's vocab_size


@eqx.filter_jit
def _fwd(model) -> jax.Array:
    return model(TOKENS)[0]


def _adapted() -> tuple[Config, Transformer]:
    """A LoRA model whose adapters change the output (B perturbed away from zero)."""
    cfg = Config(**TINY)
    model = apply_lora(Transformer(cfg, key=jax.random.key(0)), "all", rank=4, key=jax.random.key(1))
    is_lora = lambda x: isinstance(x, LoRALinear)
    mods = [x for x in jax.tree.leaves(model, is_leaf=is_lora) if is_lora(x)]
    new = [0.1 * jax.random.normal(jax.random.key(i), m.lora_b.shape) for i, m in enumerate(mods)]
    where = lambda m: [x.lora_b for x in jax.tree.leaves(m, is_leaf=is_lora) if is_lora(x)]
    return cfg, eqx.tree_at(where, model, new)


def _get(node, dotted: str):
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _from_tensors(tensors: dict[str, np.ndarray], like: Transformer) -> Transformer:
    """Rebuild a model from safetensors names alone: `blocks.{i}.<path>` are stacked back on
    the block axis, every other name is the attribute path of the array."""
    names = list(checkpoint.flatten(eqx.filter(like, eqx.is_array)))
    n = like.num_blocks
    values = []
    for name in names:
        if name.startswith("blocks."):
            rest = name[len("blocks."):]
            values.append(jnp.stack([tensors[f"blocks.{i}.{rest}"] for i in range(n)]))
        else:
            values.append(jnp.asarray(tensors[name]))
    return eqx.tree_at(lambda m: [_get(m, name) for name in names], like, values)


def test_safetensors_names_layout_and_round_trip(tmp_path):
    cfg, model = _adapted()
    path = to_safetensors(model, tmp_path / "model.safetensors", config=cfg)
    tensors = load_file(path)
    # The documented names and (in, out) shapes: D = 32, qkv out = (4 + 2 * 4) * 8 = 96,
    # MLP hidden F = 64 (SwiGLU: up is D -> 2F), V = 37, tied head (no head.weight).
    per_block = {"attn_norm.scale": (32,), "attn.qkv.weight": (32, 96), "attn.o.weight": (32, 32),
                 "mlp_norm.scale": (32,), "mlp.up.weight": (32, 128), "mlp.down.weight": (64, 32)}
    expected = {"embedding": (37, 32), "norm.scale": (32,)}
    expected |= {f"blocks.{i}.{k}": v for i in range(2) for k, v in per_block.items()}
    assert {k: v.shape for k, v in tensors.items()} == expected
    with safe_open(path, "np") as f:
        meta = f.metadata()
    assert meta["format"] == "dantinox-eqx" and "x @ W" in meta["layout"]
    assert Config.from_dict(json.loads(meta["config"])) == cfg
    # Map the tensors back by name into a fresh (differently initialised) model: exact logits.
    merged = merge_lora(model)
    rebuilt = _from_tensors(tensors, Transformer(cfg, key=jax.random.key(123)))
    np.testing.assert_array_equal(_fwd(rebuilt), _fwd(merged))
    assert float(jnp.abs(_fwd(rebuilt) - _fwd(model)).max()) < 1e-5  # = the adapter model
    # Layout by hand: block 0's qkv projection of rows x is x @ W with W as stored (in, out).
    x = np.asarray(jax.random.normal(jax.random.key(4), (3, 32)))
    qkv0 = jax.tree.map(lambda a: a[0], merged.blocks.attn.qkv)
    np.testing.assert_allclose(x @ tensors["blocks.0.attn.qkv.weight"], qkv0(jnp.asarray(x)), rtol=1e-5, atol=1e-6)


def test_safetensors_bfloat16(tmp_path):
    cfg, model = _adapted()
    tensors = load_file(to_safetensors(model, tmp_path / "w.safetensors", dtype="bfloat16"))
    assert {v.dtype for v in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    ref = merge_lora(model).blocks.attn.qkv.weight[1]
    np.testing.assert_array_equal(tensors["blocks.1.attn.qkv.weight"], np.asarray(ref.astype(jnp.bfloat16)))
    with pytest.raises(ConfigError, match="^dtype"):
        to_safetensors(model, tmp_path / "x.safetensors", dtype="float8")


def test_export_run_is_self_contained(tmp_path):
    cfg, model = _adapted()
    cfg = cfg.replace(use_lora=True, init_from=str(tmp_path / "base_run"))
    tok = build_tokenizer("char", TEXT)
    out = export_run(model, cfg, tok, tmp_path / "exported", step=7)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "model.safetensors",
                                                     "tokenizer.json"]
    saved = Config.from_yaml(out / "config.yaml")
    assert saved.use_lora is False and saved.init_from == ""
    assert saved == cfg.replace(use_lora=False, init_from="")
    assert "base_run" not in (out / "config.yaml").read_text()
    assert encode(load_tokenizer(out / "tokenizer.json"), "hello 42") == encode(tok, "hello 42")
    merged = merge_lora(model)
    like = eqx.filter(Transformer(saved, key=jax.random.key(5)), eqx.is_array)
    for which in (checkpoint.BEST, checkpoint.LATEST):
        step, params, _ = checkpoint.restore(out, which, like)
        assert step == 7
        restored = eqx.combine(params, eqx.partition(merged, eqx.is_array)[1])
        np.testing.assert_array_equal(_fwd(restored), _fwd(merged))
    rebuilt = _from_tensors(load_file(out / "model.safetensors"), Transformer(saved, key=jax.random.key(6)))
    np.testing.assert_array_equal(_fwd(rebuilt), _fwd(merged))
    # Nothing left behind beside it (the temporary build directory was renamed).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_export_run_refuses_a_non_empty_dir_and_accepts_an_empty_one(tmp_path):
    cfg, model = _adapted()
    tok = build_tokenizer("char", TEXT)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="^out_dir: .* is not empty"):
        export_run(model, cfg, tok, taken)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    export_run(model, cfg, tok, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    # A config whose shape fields do not match the model is refused before anything is written.
    with pytest.raises(ConfigError, match="^config: the model's arrays do not match"):
        export_run(model, cfg.replace(dim=64, head_size=16), tok, tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "dantinox-eqx"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=dict(os.environ), timeout=120)


@pytest.mark.slow
def test_cli_export_refuses_a_non_empty_out_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    Config(**TINY).to_yaml(run / "config.yaml")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    res = _cli("export", str(run), str(tmp_path / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "is not empty" in res.stderr.strip().splitlines()[-1]
    assert (tmp_path / "out" / "x").read_text() == "x"
