import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dantinox_eqx.config import Config
from dantinox_eqx.model import Transformer
from dantinox_eqx.train.optim import decay_mask, make_optimizer, make_schedule
from dantinox_eqx.train.step import init_opt_state, make_eval_step, make_train_step

from .conftest import TINY, one_batch_losses


def _setup(**kw):
    cfg = Config(**{**TINY, **kw})
    params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    return cfg, params, static


@pytest.mark.slow
def test_grad_accumulation_equals_concatenated_batch():
    _, params, static = _setup()
    sgd = optax.sgd(0.5)
    step = make_train_step(static, sgd, donate=False)
    batch = jax.random.randint(jax.random.key(2), (4, 3, 17), 0, 37)
    p4, _, m4 = step(params, sgd.init(params), batch, jax.random.key(0))
    p1, _, m1 = step(params, sgd.init(params), batch.reshape(1, 12, 17), jax.random.key(0))
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
    assert moved > 1e-3  # the step did something


@pytest.mark.slow
def test_overfits_one_batch():
    cfg, params, static = _setup(lr=1e-2, warmup_steps=10, max_steps=300, grad_clip=1.0)
    opt = make_optimizer(cfg, 300)
    state = init_opt_state(opt, params)
    step = make_train_step(static, opt)
    batch = jax.random.randint(jax.random.key(1), (1, 8, 17), 0, 37)
    first = None
    for i in range(300):
        params, state, metrics = step(params, state, batch, jax.random.key(i))
        first = float(metrics["loss"]) if first is None else first
    assert first > 3.0 and float(metrics["loss"]) < 0.1


@pytest.mark.slow
def test_eval_step_matches_mean_of_batches():
    _, params, static = _setup()
    ev = make_eval_step(static)
    batches = jax.random.randint(jax.random.key(5), (3, 4, 17), 0, 37)
    m = ev(params, batches)
    per = [float(ev(params, batches[i:i + 1])["loss"]) for i in range(3)]
    np.testing.assert_allclose(m["loss"], np.mean(per), rtol=1e-6)


@pytest.mark.slow
def test_frozen_leaves_are_untouched_and_have_no_optimizer_state():
    cfg, params, static = _setup()
    trainable = jax.tree.map(lambda _: False, params)
    trainable = eqx.tree_at(lambda p: p.embedding, trainable, True)
    opt = make_optimizer(cfg, 20)
    state = init_opt_state(opt, params, trainable)
    n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim)
    assert n_state == 2 * params.embedding.size  # adam mu + nu for the embedding only
    step = make_train_step(static, opt, trainable=trainable, donate=False)
    new, _, _ = step(params, state, jax.random.randint(jax.random.key(1), (1, 4, 17), 0, 37),
                     jax.random.key(0))
    np.testing.assert_array_equal(new.blocks.attn.qkv.weight, params.blocks.attn.qkv.weight)
    assert not np.array_equal(new.embedding, params.embedding)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_schedules_match_their_formulas(name):
    lr, W, T, lo = 1e-3, 10, 110, 1e-5
    s = make_schedule(name, lr, W, T, min_lr_ratio=0.01, wsd_stable_fraction=0.4)
    np.testing.assert_allclose(s(0), lr / W, rtol=1e-6)
    np.testing.assert_allclose(s(W - 1), lr, rtol=1e-6)
    np.testing.assert_allclose(s(W), lr, rtol=1e-6)  # p = 0: every schedule starts at its peak
    mid = {"cosine": (lr + lo) / 2, "linear": (lr + lo) / 2, "constant": lr,
           "wsd": lo + (lr - lo) * 0.5 * (1 + np.cos(np.pi * (0.5 - 0.4) / 0.6))}[name]
    np.testing.assert_allclose(s(W + 50), mid, rtol=1e-5)
    end = lr if name == "constant" else lo
    np.testing.assert_allclose(s(T), end, rtol=1e-5)
    if name == "wsd":
        np.testing.assert_allclose(s(W + 40), lr, rtol=1e-6)  # still stable at 40 %


def test_weight_decay_only_on_matrices():
    _, params, _ = _setup(weight_tying=False)
    mask = decay_mask(params)
    assert mask.blocks.attn.qkv.weight and mask.head.weight
    assert not mask.embedding and not mask.blocks.attn_norm.scale and not mask.norm.scale


@pytest.mark.parametrize("opt_name", ["adamw", "adafactor", "lion", "adam", "muon"])
@pytest.mark.slow
def test_every_optimizer_lowers_the_loss(opt_name):
    lr = 1e-3 if opt_name == "lion" else 3e-3  # lion takes ~3x smaller steps
    losses = one_batch_losses(Config(**{**TINY, "optimizer": opt_name, "lr": lr, "warmup_steps": 0, "max_steps": 40}))
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.slow
def test_float32_master_weights_keep_updates_that_bfloat16_rounds_away():
    """With a tiny LR, pure bf16 params round most updates to nothing; f32 masters with bf16
    compute keep them (the compute itself still runs in bf16)."""
    from dantinox_eqx.model import cast_floating

    cfg, params, static = _setup(lr=1e-6, warmup_steps=0, max_steps=5, grad_clip=0.0)
    batch = jax.random.randint(jax.random.key(1), (1, 4, 17), 0, 37)
    opt = make_optimizer(cfg, 5, mu_dtype=jnp.bfloat16)
    pure = cast_floating(params, jnp.bfloat16)
    new_pure, _, _ = make_train_step(static, opt, donate=False)(pure, init_opt_state(opt, pure), batch,
                                                                 jax.random.key(0))
    master_step = make_train_step(static, opt, donate=False, compute_dtype=jnp.bfloat16)
    new_master, _, m = master_step(params, init_opt_state(opt, params), batch, jax.random.key(0))
    w0, w_pure, w_master = (np.asarray(p.blocks.attn.qkv.weight, np.float32) for p in (params, new_pure, new_master))
    moved_pure = np.mean(w_pure != np.asarray(pure.blocks.attn.qkv.weight, np.float32))
    moved_master = np.mean(w_master != w0)
    assert new_master.blocks.attn.qkv.weight.dtype == jnp.float32 and bool(jnp.isfinite(m["loss"]))
    assert moved_master > 0.99 and moved_pure < 0.2
