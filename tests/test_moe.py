import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dantinox_eqx.config import Config
from dantinox_eqx.data.sampling import prepare_data, sample_batch
from dantinox_eqx.model import Transformer, cast_floating, expert_counts, make_mlp, param_counts
from dantinox_eqx.nn.moe import MoE, capacity
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, make_eval_step, make_train_step

from .conftest import TINY

MOE = {**TINY, "use_moe": True, "n_experts": 4, "top_k_mlp": 2}


def _cfg(**kw) -> Config:
    return Config(**{**MOE, **kw})


def _x(b=2, t=16, d=32, seed=3):
    return jax.random.normal(jax.random.key(seed), (b, t, d))


def _with_router(moe: MoE, weight) -> MoE:
    return eqx.tree_at(lambda m: m.router.weight, moe, jnp.asarray(weight, jnp.float32))


@pytest.mark.parametrize("swiglu", [True, False])
@pytest.mark.slow
def test_one_expert_top_one_equals_dense_mlp(swiglu):
    cfg = _cfg(n_experts=1, top_k_mlp=1, use_swiglu=swiglu)
    mlp = make_mlp(cfg.replace(use_moe=False), key=jax.random.key(0))
    moe = make_mlp(cfg, key=jax.random.key(1))
    moe = eqx.tree_at(lambda m: (m.up.weight, m.down.weight), moe,
                      (mlp.up.weight[None], mlp.down.weight[None]))
    x = _x()
    y_moe, bal = moe(x)
    y_mlp, _ = mlp(x)
    assert float(jnp.abs(y_mlp).max()) > 1e-3  # not trivially zero
    np.testing.assert_allclose(y_moe, y_mlp, atol=1e-6)
    np.testing.assert_allclose(bal, 1.0, atol=1e-6)


@pytest.mark.slow
def test_one_expert_model_equals_dense_model():
    moe_model = Transformer(_cfg(n_experts=1, top_k_mlp=1), key=jax.random.key(0))
    dense = Transformer(Config(**TINY), key=jax.random.key(0))
    dense = eqx.tree_at(lambda m: (m.blocks.mlp.up.weight, m.blocks.mlp.down.weight), dense,
                        (moe_model.blocks.mlp.up.weight[:, 0], moe_model.blocks.mlp.down.weight[:, 0]))
    dense = eqx.tree_at(lambda m: m.blocks.attn, dense, moe_model.blocks.attn)
    toks = jax.random.randint(jax.random.key(1), (2, 16), 0, 37)
    (a, bal), (b, _) = moe_model(toks), dense(toks)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(bal, 1.0, atol=1e-6)


@pytest.mark.slow
def test_balance_is_one_for_uniform_routing():
    E = 4
    moe = make_mlp(_cfg(n_experts=E, top_k_mlp=1), key=jax.random.key(0))
    # Uniform router probabilities: a zero router.
    _, bal = _with_router(moe, np.zeros((32, E)))(_x())
    np.testing.assert_allclose(bal, 1.0, atol=1e-6)
    # Peaked per token but balanced: token i goes to expert i % E with the same confidence,
    # so every expert gets N / E tokens and the same mean probability.
    router = np.zeros((32, E))
    router[:E, :E] = 5.0 * np.eye(E)
    x = jnp.asarray(np.eye(32)[np.arange(16) % E]).reshape(1, 16, 32)
    moe = _with_router(moe, router)
    _, bal = moe(x)
    r = moe.route(x[0])
    assert float(r.probs.max(-1).min()) > 0.9  # confident routing, not uniform probabilities
    np.testing.assert_array_equal(np.bincount(np.asarray(r.experts[:, 0]), minlength=E), [4, 4, 4, 4])
    np.testing.assert_allclose(bal, 1.0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_balance_grows_when_routing_collapses(k):
    E = 4
    router = np.zeros((32, E))
    router[0, :k] = 8.0  # every token prefers the first k experts
    moe = _with_router(make_mlp(_cfg(n_experts=E, top_k_mlp=k), key=jax.random.key(0)), router)
    x = jnp.zeros((2, 16, 32)).at[..., 0].set(1.0)
    _, bal = moe(x)
    # All assignments on k experts, each with probability ~1/k: balance -> E / k.
    assert E / k - 0.05 < float(bal) <= E / k + 1e-5


def test_capacity_drops_exactly_the_overflow():
    cfg = _cfg(n_experts=4, top_k_mlp=1)
    dropless = make_mlp(cfg, key=jax.random.key(0))
    dropless = _with_router(dropless, 3.0 * jax.random.normal(jax.random.key(1), (32, 4)))
    tiny = eqx.tree_at(lambda m: m.up, make_mlp(cfg.replace(capacity_factor=0.25), key=jax.random.key(0)),
                       dropless.up)
    tiny = eqx.tree_at(lambda m: (m.down, m.router), tiny, (dropless.down, dropless.router))
    x = _x(b=2, t=16)
    N = 32
    C = capacity(N, 4, 1, 0.25)
    assert C == 2
    y_full, bal_full = dropless(x)
    y_cap, bal_cap = tiny(x)
    # Reference: expert e keeps its first C tokens in (batch, time) order, the rest output 0.
    experts = np.asarray(dropless.route(x.reshape(N, 32)).experts[:, 0])
    seen = np.zeros(4, int)
    kept = np.zeros(N, bool)
    for n, e in enumerate(experts):
        kept[n] = seen[e] < C
        seen[e] += 1
    assert kept.sum() < N // 2  # the capacity really bites
    ref = np.where(kept[:, None], np.asarray(y_full).reshape(N, 32), 0.0)
    np.testing.assert_allclose(np.asarray(y_cap).reshape(N, 32), ref, atol=1e-6)
    np.testing.assert_allclose(bal_cap, bal_full, atol=1e-6)  # balance counts routed, not kept


def test_large_capacity_equals_dropless():
    cfg = _cfg(n_experts=4, top_k_mlp=2)
    dropless = make_mlp(cfg, key=jax.random.key(0))
    roomy = make_mlp(cfg.replace(capacity_factor=50.0), key=jax.random.key(0))
    x = _x()
    np.testing.assert_array_equal(roomy(x)[0], dropless(x)[0])
    tight = make_mlp(cfg.replace(capacity_factor=0.5), key=jax.random.key(0))
    assert float(jnp.abs(tight(x)[0] - dropless(x)[0]).max()) > 1e-4


def test_shared_expert_adds_a_dense_mlp():
    cfg = _cfg(shared_expert=True)
    moe = make_mlp(cfg, key=jax.random.key(0))
    routed_only = eqx.tree_at(lambda m: m.shared, moe, None, is_leaf=lambda n: n is None)
    x = _x()
    np.testing.assert_allclose(moe(x)[0], routed_only(x)[0] + moe.shared(x)[0], atol=1e-6)


@pytest.mark.slow
def test_no_python_loop_over_experts():
    """The traced program has the same number of operations whatever n_experts is."""
    x = _x()
    n_ops = [len(jax.make_jaxpr(lambda m, x: m(x))(make_mlp(_cfg(n_experts=e), key=jax.random.key(0)), x).eqns)
             for e in (2, 8)]
    assert n_ops[0] == n_ops[1]


@pytest.mark.slow
def test_kv_cache_equals_full_forward_with_moe():
    model = Transformer(_cfg(), key=jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 16), 0, 37)
    full, _ = model(toks)
    decode = eqx.filter_jit(lambda m, t, p, c: m.decode(t, p, c))
    out, cache = decode(model, toks[:, :5], jnp.broadcast_to(jnp.arange(5), (2, 5)), model.init_cache(2))
    pieces = [out]
    for t in range(5, 16):
        o, cache = decode(model, toks[:, t:t + 1], jnp.full((2, 1), t), cache)
        pieces.append(o)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-5)


@pytest.mark.slow
def test_expert_counts_sum_to_assignments_and_match_the_router():
    cfg = _cfg(num_blocks=1)
    model = Transformer(cfg, key=jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 16), 0, 37)
    counts = expert_counts(model, toks)
    assert counts.shape == (1, 4)
    assert int(counts.sum()) == 2 * 16 * 2
    blk = jax.tree.map(lambda a: a[0], model.blocks)  # the one block, unstacked
    x = model.embed(toks, jnp.arange(16))
    x = x + blk.attn(blk.attn_norm(x), jnp.arange(16))[0]
    experts = blk.mlp.route(blk.mlp_norm(x).reshape(32, 32)).experts
    np.testing.assert_array_equal(counts[0], np.bincount(np.asarray(experts).ravel(), minlength=4))


@pytest.mark.parametrize("shared", [False, True])
def test_param_counts_total_and_active(shared):
    cfg = _cfg(shared_expert=shared)
    model = Transformer(cfg, key=jax.random.key(0))
    arrays = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    total = sum(a.size for a in arrays)
    routed = model.blocks.mlp.up.weight.size + model.blocks.mlp.down.weight.size
    E, k = cfg.n_experts, cfg.top_k_mlp
    assert param_counts(model) == (total, total - routed * (E - k) // E)
    assert param_counts(cfg) == param_counts(model)  # from shapes only
    dense = Transformer(Config(**TINY), key=jax.random.key(0))
    n = sum(a.size for a in jax.tree.leaves(eqx.filter(dense, eqx.is_array)))
    assert param_counts(dense) == (n, n)
    # One expert's MLP is the dense MLP: active = dense + router (+ shared expert).
    extra = model.blocks.mlp.router.weight.size + (model.blocks.mlp.shared.up.weight.size
                                                   + model.blocks.mlp.shared.down.weight.size if shared else 0)
    assert param_counts(model)[1] == n + extra + (k - 1) * routed // E


def _steps(cfg: Config, batch_fn, n_steps: int, dtype=None):
    model = Transformer(cfg, key=jax.random.key(0))
    if dtype is not None:
        model = cast_floating(model, dtype)
    params, static = eqx.partition(model, eqx.is_array)
    opt = make_optimizer(cfg, n_steps)
    state = init_opt_state(opt, params)
    step = make_train_step(static, opt, alpha_balance=cfg.alpha_balance)
    history = []
    for i in range(n_steps):
        params, state, m = step(params, state, batch_fn(i), jax.random.key(i))
        history.append({k: float(v) for k, v in m.items()})
    return params, static, history


@pytest.mark.slow
def test_moe_model_trains_on_shakespeare(small_corpus):
    data = prepare_data(small_corpus, tokenizer_type="char", max_context=32, val_fraction=0.1)
    cfg = Config(**{**MOE, "vocab_size": data.tokenizer.get_vocab_size(), "max_context": 32,
                    "batch_size": 8, "lr": 1e-2, "warmup_steps": 10, "max_steps": 200})
    train = jnp.asarray(data.train)
    batch = lambda i: sample_batch(train, jax.random.fold_in(jax.random.key(7), i), 8, 32)
    params, static, hist = _steps(cfg, batch, 200)  # the plays' 20 kB (64 symbols) need 200 steps
    first = np.mean([h["loss"] for h in hist[:5]])
    last = np.mean([h["loss"] for h in hist[-5:]])
    assert last < first - 1.0, (first, last)
    assert all(h["bal"] > 0.5 for h in hist)  # train_bal is logged and non-zero
    val = make_eval_step(static)(params, sample_batch(jnp.asarray(data.val), jax.random.key(0), 4, 32, accum=2))
    assert float(val["bal"]) > 0.5 and np.isfinite(float(val["loss"]))


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.slow
def test_moe_with_grad_accum_and_bf16(dtype):
    n = 12 if dtype is None else 3  # bfloat16 matmuls are slow on CPU: check finiteness only
    cfg = _cfg(grad_accum=2, lr=1e-2, warmup_steps=0, max_steps=n, capacity_factor=1.25)
    batch = jax.random.randint(jax.random.key(1), (2, 4, 17), 0, 37)
    params, _, hist = _steps(cfg, lambda i: batch, n, dtype)
    assert all(np.isfinite(h["loss"]) and h["bal"] > 0.5 for h in hist)
    if dtype is None:
        assert hist[-1]["loss"] < hist[0]["loss"] - 0.3
    else:
        assert params.blocks.mlp.up.weight.dtype == dtype


def test_stacked_expert_weights_are_decayed_and_named_weight():
    from dantinox_eqx.train.optim import decay_mask

    model = Transformer(_cfg(), key=jax.random.key(0))
    assert model.blocks.mlp.up.weight.shape == (2, 4, 32, 2 * 2 * 32)  # (L, E, D, 2F)
    mask = decay_mask(eqx.filter(model, eqx.is_array))
    assert mask.blocks.mlp.up.weight and mask.blocks.mlp.down.weight and mask.blocks.mlp.router.weight
    assert isinstance(optax.adamw(1e-3, mask=decay_mask).init(eqx.filter(model, eqx.is_array)), tuple)
    assert math.isclose(capacity(100, 4, 2, 1.0), 50)
