"""optimizer: muon (issue 16): Muon's update against a reference Newton-Schulz written here,
per-layer (and per-expert, per-projection) orthogonalisation of the stacked blocks, the AdamW
group, LoRA, grad accumulation, FSDP, exact resume and the bad-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dantinox_eqx.config import Config, ConfigError
from dantinox_eqx.lora import apply_lora, lora_trainable
from dantinox_eqx.model import Transformer
from dantinox_eqx.train.muon import param_groups
from dantinox_eqx.train.optim import make_optimizer, make_schedule
from dantinox_eqx.train.step import init_opt_state, make_train_step

from .conftest import TINY, one_batch_losses
from .procs import device_env

BETA = 0.95
LR = 0.02  # muon_lr; a constant schedule without warmup, no clipping and no weight decay below


def _setup(**kw):
    cfg = Config(**{**TINY, "optimizer": "muon", "muon_lr": LR, "lr_schedule": "constant", "warmup_steps": 0,
                    "grad_clip": 0.0, **kw})
    params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    return cfg, params, static


def _grads(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


# --------------------------------------------------------------------------- the reference
def newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """Keller Jordan's quintic Newton-Schulz iteration on ONE matrix (float32 numpy)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = (g / (np.linalg.norm(g) + 1e-8)).astype(np.float32)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if tall else x


def reference_updates(grads: list[np.ndarray], lrs: list[float] | None = None) -> list[np.ndarray]:
    """Muon's updates of one matrix (d_in, d_out) over steps t = 1, 2, ... (module doc of
    muon.py), at learning rates `lrs` (default: LR at every step)."""
    mom, out = np.zeros_like(grads[0]), []
    for t, g in enumerate(grads, 1):
        mom = BETA * mom + (1 - BETA) * g
        nesterov = BETA * mom / (1 - BETA ** (t + 1)) + (1 - BETA) * g / (1 - BETA**t)
        d_in, d_out = g.shape
        lr = LR if lrs is None else lrs[t - 1]
        out.append(-lr * np.sqrt(max(1.0, d_out / d_in)) * newton_schulz(nesterov))
    return out


def _run_updates(cfg, params, n_steps=3, trainable=None):
    """The optimizer's updates for n_steps random gradient trees (and those gradients)."""
    opt = make_optimizer(cfg, 100)
    train = params if trainable is None else eqx.filter(params, trainable)
    state = init_opt_state(opt, params, trainable)
    grads, updates = [], []
    update = jax.jit(opt.update)
    for s in range(n_steps):
        g = _grads(train, s)
        u, state = update(g, state, train)
        grads.append(g)
        updates.append(u)
    return grads, updates


def _check(get, grads, updates, split=None, lrs=None):
    """Every matrix get(tree)[i...] (and each of its output-axis parts `split`) equals the reference."""
    stack = np.asarray(get(grads[0]))
    for idx in np.ndindex(stack.shape[:-2]):
        parts = [(0, stack.shape[-1])] if split is None else split
        for lo, hi in parts:
            want = reference_updates([np.asarray(get(g))[idx][:, lo:hi] for g in grads], lrs)
            got = [np.asarray(get(u))[idx][:, lo:hi] for u in updates]
            for w, x in zip(want, got):
                np.testing.assert_allclose(x, w, rtol=2e-4, atol=2e-6)


@pytest.mark.slow
def test_update_equals_reference_newton_schulz_per_layer_and_projection():
    cfg, params, _ = _setup(use_swiglu=True, kv_heads=2)
    grads, updates = _run_updates(cfg, params)
    H, K, E, F = cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.expansion * cfg.dim
    _check(lambda t: t.blocks.attn.o.weight, grads, updates)  # (2, 32, 32): square
    _check(lambda t: t.blocks.mlp.down.weight, grads, updates)  # (2, 64, 32): tall, transposed
    # fused projections: q, k, v (32, 16, 16 columns) and SwiGLU's gate and value (64 each)
    _check(lambda t: t.blocks.attn.qkv.weight, grads, updates,
           split=[(0, H * E), (H * E, H * E + K * E), (H * E + K * E, (H + 2 * K) * E)])
    _check(lambda t: t.blocks.mlp.up.weight, grads, updates, split=[(0, F), (F, 2 * F)])


@pytest.mark.slow
def test_muon_lr_follows_the_schedule_scaled_to_muon_lr():
    """Warmup then cosine: Muon's lr at update s is schedule(s) * muon_lr / lr."""
    cfg, params, _ = _setup(lr=1e-3, lr_schedule="cosine", warmup_steps=2)
    grads, updates = _run_updates(cfg, params, n_steps=4)
    schedule = make_schedule("cosine", 1e-3, 2, 100, cfg.min_lr_ratio)
    lrs = [float(schedule(s)) * LR / 1e-3 for s in range(4)]
    assert lrs[0] == pytest.approx(LR / 2) and lrs[1] == pytest.approx(LR)
    _check(lambda t: t.blocks.attn.o.weight, grads, updates, lrs=lrs)


def test_stacked_blocks_are_orthogonalised_per_layer_not_as_one_matrix():
    cfg, params, _ = _setup(use_swiglu=False)
    grads, updates = _run_updates(cfg, params, n_steps=1)
    g, u = np.asarray(grads[0].blocks.attn.o.weight), np.asarray(updates[0].blocks.attn.o.weight)
    # Each layer's update is (a multiple of) a near-orthogonal matrix: singular values in ~[0.5, 1.5]
    for layer in range(g.shape[0]):
        s = np.linalg.svd(u[layer] / -LR, compute_uv=False)
        assert 0.3 < s.min() and s.max() < 1.6
    # ... which the whole stack orthogonalised as one (2*32, 32) matrix is not.
    whole = -LR * newton_schulz(g.reshape(-1, g.shape[-1])).reshape(g.shape)
    assert np.abs(whole - u).max() > 0.1 * np.abs(u).max()
    # Fused qkv orthogonalised as one matrix differs from per-projection (the check above).
    qkv_g = np.asarray(grads[0].blocks.attn.qkv.weight)[0]
    fused = -LR * np.sqrt(3.0) * newton_schulz(qkv_g)
    assert np.abs(fused - np.asarray(updates[0].blocks.attn.qkv.weight)[0]).max() > 1e-3


@pytest.mark.slow
def test_moe_experts_are_orthogonalised_per_expert_and_the_router_is_adamw():
    cfg, params, _ = _setup(use_moe=True, n_experts=4, use_swiglu=False)
    grads, updates = _run_updates(cfg, params, n_steps=2)
    assert params.blocks.mlp.down.weight.shape == (2, 4, 64, 32)
    _check(lambda t: t.blocks.mlp.down.weight, grads, updates)  # each of 2 x 4 expert matrices
    groups = param_groups(cfg, params)["optimizer_groups"]
    assert groups["muon"]["params"]["blocks.mlp.down.weight"] == "8 x 64x32"
    assert "blocks.mlp.router.weight" in groups["adamw"]["params"]


@pytest.mark.slow
def test_everything_else_is_exactly_adamw():
    """The AdamW group of muon gets the updates that optimizer adamw gives the same leaves."""
    cfg, params, _ = _setup(weight_tying=False, weight_decay=0.1)
    _, muon_updates = _run_updates(cfg, params)
    _, adamw_updates = _run_updates(cfg.replace(optimizer="adamw"), params)
    groups = param_groups(cfg, params)["optimizer_groups"]
    assert sorted(groups["adamw"]["params"]) == sorted(
        ["embedding", "head.weight", "norm.scale", "blocks.attn_norm.scale", "blocks.mlp_norm.scale"])
    assert groups["muon"]["lr"] == LR and groups["adamw"]["lr"] == cfg.lr
    for get in (lambda t: t.embedding, lambda t: t.head.weight, lambda t: t.norm.scale,
                lambda t: t.blocks.mlp_norm.scale):
        for a, b in zip(muon_updates, adamw_updates):
            np.testing.assert_array_equal(get(a), get(b))


def test_muon_params_attention_leaves_the_mlp_on_adamw():
    cfg, params, _ = _setup(muon_params="attention")
    groups = param_groups(cfg, params)["optimizer_groups"]
    assert sorted(groups["muon"]["params"]) == ["blocks.attn.o.weight", "blocks.attn.qkv.weight"]
    assert {"blocks.mlp.up.weight", "blocks.mlp.down.weight"} <= set(groups["adamw"]["params"])


@pytest.mark.slow
def test_lora_factors_are_muon_matrices():
    cfg, params, static = _setup(lora_targets="all")
    model = apply_lora(eqx.combine(params, static), "all", rank=4, key=jax.random.key(3))
    trainable = lora_trainable(model)
    params = eqx.filter(model, eqx.is_array)
    groups = param_groups(cfg, params, trainable)["optimizer_groups"]
    assert groups["adamw"]["params"] == [] and len(groups["muon"]["params"]) == 8  # 4 Linears x (A, B)
    assert groups["muon"]["params"]["blocks.attn.qkv.lora_b"] == "2 x 4x96"  # one update of the fused map
    grads, updates = _run_updates(cfg, params, n_steps=2, trainable=trainable)
    _check(lambda t: t.blocks.mlp.down.lora_a, grads, updates)  # (2, 64, 4)
    _check(lambda t: t.blocks.attn.qkv.lora_b, grads, updates)  # (2, 4, 96), whole
    with pytest.raises(ConfigError, match="muon_params: 'attention' selects no trainable matrix"):
        mlp_only = apply_lora(eqx.combine(*_setup()[1:]), "mlp", rank=4, key=jax.random.key(3))
        opt = make_optimizer(cfg.replace(muon_params="attention"), 10)
        init_opt_state(opt, eqx.filter(mlp_only, eqx.is_array), lora_trainable(mlp_only))


@pytest.mark.parametrize("kw", [{}, {"use_moe": True, "use_swiglu": False}, {"mla": True, "rope_dim": 4,
                                                                             "down_dim_q": 16, "down_dim_kv": 16}])
@pytest.mark.slow
def test_muon_lowers_the_loss(kw):
    cfg = _setup(lr=3e-3, grad_clip=1.0, lr_schedule="cosine", warmup_steps=5, **kw)[0]
    losses = one_batch_losses(cfg, 40, alpha_balance=cfg.alpha_balance if cfg.use_moe else 0.0)
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.slow
def test_grad_accumulation_with_muon_equals_the_concatenated_batch():
    cfg, params, static = _setup(grad_clip=1.0)
    opt = make_optimizer(cfg, 10)
    step = make_train_step(static, opt, donate=False)
    batch = jax.random.randint(jax.random.key(2), (4, 3, 17), 0, 37)
    p4, s4, _ = step(params, init_opt_state(opt, params), batch, jax.random.key(0))
    p1, s1, _ = step(params, init_opt_state(opt, params), batch.reshape(1, 12, 17), jax.random.key(0))
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_bad_muon_inputs_name_the_field():
    for value in ("head", "embedding", "all"):
        with pytest.raises(ConfigError, match=f"muon_params: Muon cannot train '{value}'"):
            Config(optimizer="muon", muon_params=value)
    with pytest.raises(ConfigError, match="muon_params: unknown value 'atention'.*did you mean 'attention'"):
        Config(muon_params="atention")
    with pytest.raises(ConfigError, match="muon_lr: must be positive"):
        Config(muon_lr=0.0)
    with pytest.raises(ConfigError, match="muon_momentum"):
        Config(muon_momentum=1.0)


# --------------------------------------------------------------------------- FSDP, resume
FSDP_SCRIPT = """
import json, sys
import equinox as eqx, jax
from dantinox_eqx.parallel import sharding as sh
from dantinox_eqx.config import Config
from dantinox_eqx.model import Transformer
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, make_train_step
cfg = Config(**json.loads(sys.argv[1]))
out = {}
for mode, n in (("dp", 1), ("fsdp", 2)):
    params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    opt = make_optimizer(cfg, 10)
    mesh = sh.make_mesh(n, batch_size=cfg.batch_size)
    params, state = sh.place(params, init_opt_state(opt, params), mesh, mode)
    step = sh.shard_train_step(make_train_step(static, opt), mesh, params, state)
    losses = []
    for s in range(10):
        batch = jax.random.randint(jax.random.key(1), (1, 8, 17), 0, 37)  # one batch: it must fit it
        params, state, m = step(params, state, sh.shard_batch(batch, mesh, 1), jax.random.key(s))
        losses.append(float(m["loss"]))
    out[mode] = {"losses": losses, "state_bytes": sh.bytes_per_device(state)["max"]}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_muon_under_fsdp_matches_one_device():
    cfg = {**TINY, "optimizer": "muon", "batch_size": 8, "warmup_steps": 2}
    proc = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, json.dumps(cfg)], env=device_env(2),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["fsdp"]["losses"], out["dp"]["losses"], rtol=2e-5)
    assert out["dp"]["losses"][-1] < out["dp"]["losses"][0] - 0.3
    assert out["fsdp"]["state_bytes"] < 0.7 * out["dp"]["state_bytes"]  # the Muon state is sharded too


def _corpus(tmp_path: Path) -> Path:
    """A seeded synthetic text (no corpus outside the repository): words over 20 letters."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrst"), size=rng.integers(2, 7))) for _ in range(60)]
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(rng.choice(words, size=6000)) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_resume_with_muon_is_bitwise_exact(tmp_path: Path):
    from dantinox_eqx.run import checkpoint as ckpt
    from dantinox_eqx.train.trainer import Trainer, read_log

    corpus = _corpus(tmp_path)
    # A constant schedule does not depend on the run's length: 10 steps then 10 more is the
    # same schedule as 20 straight (max_steps may change on resume).
    base = {**TINY, "vocab_size": None, "optimizer": "muon", "lr_schedule": "constant", "warmup_steps": 4,
            "eval_interval": 5, "dropout_rate": 0.1, "use_swiglu": True}
    full = Trainer(Config(**{**base, "max_steps": 20}), progress=False).fit(corpus, run_dir=tmp_path / "full")
    part = Trainer(Config(**{**base, "max_steps": 10}), progress=False).fit(corpus, run_dir=tmp_path / "part")
    Trainer(Config(**{**base, "max_steps": 20}), progress=False).fit(corpus, run_dir=part, resume=True)

    exact = ("step", "train_loss", "val_loss", "lr")
    rows = [[{k: r[k] for k in exact} for r in read_log(run / "training_log.csv")] for run in (full, part)]
    assert rows[0] == rows[1] and len(rows[0]) == 4
    cfg = Config.from_yaml(full / "config.yaml")
    params = eqx.filter(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    opt = make_optimizer(cfg, 20)
    like = {"opt_state": init_opt_state(opt, params), "step": jnp.zeros((), jnp.int32), "key": jax.random.key(0),
            "best_val_loss": jnp.zeros(()), "best_step": jnp.zeros((), jnp.int32),
            "evals_without_improvement": jnp.zeros((), jnp.int32)}
    a, b = (ckpt.restore(run, ckpt.LATEST, params, like) for run in (full, part))
    assert a[0] == b[0] == 20
    flat_a, flat_b = ckpt.flatten((a[1], a[2])), ckpt.flatten((b[1], b[2]))  # PRNG keys as raw data
    assert flat_a.keys() == flat_b.keys() and any(".mu." in name for name in flat_a)
    for name in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[name]), np.asarray(flat_b[name]))  # params, Muon/AdamW state
    summary = json.loads((full / "model_summary.json").read_text())
    assert "blocks.attn.qkv.weight" in summary["optimizer_groups"]["muon"]["params"]
    assert "embedding" in summary["optimizer_groups"]["adamw"]["params"]


@pytest.mark.slow
def test_muon_with_pure_bfloat16_params_and_moments():
    """use_bf16 without master weights: bfloat16 params, gradients and Muon momentum."""
    from dantinox_eqx.model import cast_floating

    cfg, params, static = _setup(lr=3e-3, warmup_steps=0)
    params = cast_floating(params, jnp.bfloat16)
    opt = make_optimizer(cfg, 20, mu_dtype=jnp.bfloat16)
    state = init_opt_state(opt, params)
    assert {x.dtype for x in jax.tree.leaves(state) if x.ndim >= 3} == {jnp.dtype(jnp.bfloat16)}
    step = make_train_step(static, opt)
    batch = jax.random.randint(jax.random.key(1), (1, 8, 17), 0, 37)
    losses = []
    for i in range(20):
        params, state, m = step(params, state, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert params.blocks.attn.o.weight.dtype == jnp.bfloat16 and losses[-1] < losses[0] - 0.5
