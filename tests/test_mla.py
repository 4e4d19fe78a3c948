import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dantinox_eqx.config import Config
from dantinox_eqx.model import Transformer, cast_floating, make_attention
from dantinox_eqx.nn.mla import MLACache, for_inference
from dantinox_eqx.run.checkpoint import flatten
from dantinox_eqx.run.summary import cache_bytes_per_token, cache_summary
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, make_train_step

from .conftest import TINY

MLA = {**TINY, "mla": True, "down_dim_q": 16, "down_dim_kv": 12, "rope_dim": 4}


def _cfg(**kw) -> Config:
    return Config(**{**MLA, **kw})


def _model(cfg: Config, seed: int = 0) -> Transformer:
    """A model with O(1) activations (init-scale weights make every logit ~0 and every
    attention row ~uniform, so equivalences would hold trivially)."""
    model = Transformer(cfg, key=jax.random.key(seed))
    params, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    new = []
    for (path, leaf), k in zip(leaves, keys):
        name = getattr(path[-1], "name", None)
        if name == "weight":
            new.append(jax.random.normal(k, leaf.shape) / np.sqrt(leaf.shape[-2]))
        elif name == "embedding":
            new.append(jax.random.normal(k, leaf.shape))
        else:
            new.append(leaf)
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, new), static)


def _tokens(b=2, t=16, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, 37)


_decode = eqx.filter_jit(lambda m, t, p, c: m.decode(t, p, c))
_forward = eqx.filter_jit(lambda m, t: m(t)[0])


@pytest.mark.parametrize("kw", [{}, {"sliding_window": True, "context_window": 5},
                                {"sliding_window": True, "context_window": 5, "no_sink": True},
                                {"rope_scale_factor": 4.0}, {"kv_heads": 2, "norm_type": "layernorm"},
                                {"use_rotary_pos": False, "absolute_pos": True}])
@pytest.mark.slow
def test_naive_and_absorbed_logits_match(kw):
    cfg = _cfg(**kw)
    naive = _model(cfg)
    absorbed = for_inference(naive)
    assert naive.blocks.attn.absorbed is False and absorbed.blocks.attn.absorbed is True
    toks = _tokens()
    a, b = _forward(naive, toks), _forward(absorbed, toks)
    assert float(a.std()) > 1.0  # far from the trivial init-scale regime
    assert float(jnp.abs(a - b).max()) < 1e-4


def test_inference_flag_changes_computation_not_parameters():
    cfg = _cfg()
    built = Transformer(cfg.replace(inference=True), key=jax.random.key(0))
    trained = Transformer(cfg, key=jax.random.key(0))
    flat_b, flat_t = flatten(eqx.filter(built, eqx.is_array)), flatten(eqx.filter(trained, eqx.is_array))
    assert flat_b.keys() == flat_t.keys()  # the same leaves: the same checkpoint layout
    for name in flat_b:
        np.testing.assert_array_equal(flat_b[name], flat_t[name])
    switched = for_inference(trained)
    assert switched.blocks.attn.q_up.weight is trained.blocks.attn.q_up.weight  # not copied
    assert jax.tree.structure(switched) == jax.tree.structure(built)  # static flag included
    assert for_inference(switched, inference=False).blocks.attn.absorbed is False
    dense = Transformer(Config(**TINY), key=jax.random.key(0))
    assert for_inference(dense) is dense


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.slow
def test_kv_cache_decode_equals_full_forward(inference):
    model = for_inference(_model(_cfg()), inference)
    toks = _tokens()
    full = _forward(model, toks)
    out, cache = _decode(model, toks[:, :6], jnp.broadcast_to(jnp.arange(6), (2, 6)), model.init_cache(2))
    assert isinstance(cache, MLACache)
    pieces = [out]
    for t in range(6, 16):
        o, cache = _decode(model, toks[:, t:t + 1], jnp.full((2, 1), t), cache)
        pieces.append(o)
    assert float(jnp.abs(jnp.concatenate(pieces, 1) - full).max()) < 1e-4


def _greedy(model: Transformer, prompt, n_new: int):
    """Greedy decoding with model.decode; runs past max_context (the ring buffer slides)."""
    B, P = prompt.shape
    logits, cache = _decode(model, prompt, jnp.broadcast_to(jnp.arange(P), (B, P)), model.init_cache(B))
    out = [prompt]
    nxt = jnp.argmax(logits[:, -1], -1)[:, None]
    for i in range(n_new):
        out.append(nxt)
        logits, cache = _decode(model, nxt, jnp.full((B, 1), P + i), cache)
        nxt = jnp.argmax(logits[:, -1], -1)[:, None]
    return np.asarray(jnp.concatenate(out, 1))


@pytest.mark.slow
def test_greedy_generation_is_identical_in_both_forms():
    naive = _model(_cfg(sliding_window=True, context_window=6, weight_tying=False))
    prompt = _tokens(t=4, seed=5)
    a = _greedy(naive, prompt, 20)  # 24 tokens > max_context 16
    b = _greedy(for_inference(naive), prompt, 20)
    assert len(set(a[:, 4:].ravel().tolist())) > 5  # a non-degenerate continuation
    np.testing.assert_array_equal(a, b)


def test_absorbed_decoding_never_decompresses_the_cache():
    """Naive decoding builds K/V (B, S, 2 * H * E) from the cached latent; absorbed does not."""
    cfg = _cfg()
    cache = Transformer(cfg, key=jax.random.key(0)).init_cache(2)
    kv_shape = "[2,16,64]"  # B=2, S=max_context=16, 2 * n_heads * head_size = 64

    def program(inference):
        model = Transformer(cfg.replace(inference=inference), key=jax.random.key(0))
        return str(jax.make_jaxpr(lambda m, c: m.decode(jnp.zeros((2, 1), jnp.int32),
                                                         jnp.zeros((2, 1), jnp.int32), c))(model, cache))

    assert kv_shape in program(False)
    assert kv_shape not in program(True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cache_bytes_match_formula_and_arrays(dtype):
    cfg = _cfg()
    item = jnp.dtype(dtype).itemsize
    assert cache_bytes_per_token(cfg, dtype) == (12 + 4) * item
    cache = Transformer(cfg, key=jax.random.key(0)).init_cache(3, 10, dtype)
    assert set(vars(cache)) == {"c_kv", "k_rope", "pos"}  # only the latent and the RoPE key
    L, B, S = cfg.num_blocks, 3, 10
    assert cache.c_kv.shape == (L, B, S, 12) and cache.k_rope.shape == (L, B, S, 4)
    assert cache.c_kv.nbytes + cache.k_rope.nbytes == L * B * S * cache_bytes_per_token(cfg, dtype)
    gqa_cfg = Config(**{**TINY, "kv_heads": 2})
    gqa = Transformer(gqa_cfg, key=jax.random.key(0)).init_cache(3, 10, dtype)
    assert cache_bytes_per_token(gqa_cfg, dtype) == 2 * 2 * 8 * item
    assert gqa.k.nbytes + gqa.v.nbytes == L * B * S * cache_bytes_per_token(gqa_cfg, dtype)
    summary = cache_summary(cfg.replace(kv_heads=2), dtype)
    assert summary == {"kv_cache_dtype": jnp.dtype(dtype).name,
                       "kv_cache_bytes_per_token_per_layer": 16 * item,
                       "kv_cache_bytes_per_token": 2 * 16 * item,
                       "gqa_kv_cache_bytes_per_token_per_layer": 32 * item}


def test_mla_ignores_kv_heads():
    toks = _tokens()
    a = _model(_cfg())
    b = _model(_cfg(kv_heads=1))
    assert jax.tree.structure(eqx.filter(a, eqx.is_array)) == jax.tree.structure(eqx.filter(b, eqx.is_array))
    np.testing.assert_array_equal(_forward(a, toks), _forward(b, toks))


@pytest.mark.parametrize("inference", [False, True])
def test_causal_in_both_forms(inference):
    model = for_inference(_model(_cfg()), inference)
    toks = _tokens()
    t = 9
    base = _forward(model, toks)
    out = _forward(model, toks.at[:, t].set((toks[:, t] + 1) % 37))
    np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
    assert float(jnp.abs(out[:, t:] - base[:, t:]).max()) > 1e-3


@pytest.mark.slow
def test_attention_module_shapes_and_projections():
    attn = make_attention(_cfg(), key=jax.random.key(0))
    assert attn.q_down.weight.shape == (32, 16) and attn.q_up.weight.shape == (16, 4 * (8 + 4))
    assert attn.kv_down.weight.shape == (32, 12 + 4) and attn.kv_up.weight.shape == (12, 2 * 4 * 8)
    assert attn.o.weight.shape == (32, 32)
    y, cache = attn(jax.random.normal(jax.random.key(1), (2, 5, 32)), jnp.arange(5))
    assert y.shape == (2, 5, 32) and cache is None


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.slow
def test_mla_trains_with_grad_accum_dropout_and_bf16(dtype):
    n = 12 if dtype is None else 3  # bfloat16 matmuls are slow on CPU: check finiteness only
    cfg = _cfg(grad_accum=2, lr=1e-2, warmup_steps=0, max_steps=n, dropout_rate=0.1)
    model = Transformer(cfg, key=jax.random.key(0))
    if dtype is not None:
        model = cast_floating(model, dtype)
    params, static = eqx.partition(model, eqx.is_array)
    opt = make_optimizer(cfg, n)
    state = init_opt_state(opt, params)
    step = make_train_step(static, opt)
    batch = jax.random.randint(jax.random.key(1), (2, 4, 17), 0, 37)
    losses = []
    for i in range(n):
        params, state, m = step(params, state, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all()
    if dtype is None:
        assert losses[-1] < losses[0] - 0.3
    else:
        assert params.blocks.attn.kv_up.weight.dtype == dtype
        logits = _forward(for_inference(eqx.combine(params, static)), _tokens())
        assert logits.dtype == dtype and bool(jnp.isfinite(logits.astype(jnp.float32)).all())


class _LowRankDelta(eqx.Module):
    """A stand-in for an unmerged LoRA wrapper: base(x) + x @ a @ b (no `weight` field)."""

    base: eqx.Module
    a: jax.Array
    b: jax.Array

    def __call__(self, x, *, key=None):  # a projection takes the call's key= (LoRA dropout)
        return self.base(x) + x @ self.a.astype(x.dtype) @ self.b.astype(x.dtype)


@pytest.mark.slow
def test_absorbed_form_with_a_wrapped_kv_up():
    model = _model(_cfg())
    kv_up = model.blocks.attn.kv_up  # stacked: weight (L, C, 2HE)
    L, C, out = kv_up.weight.shape
    ka, kb = jax.random.split(jax.random.key(9))
    wrapped = _LowRankDelta(kv_up, 0.3 * jax.random.normal(ka, (L, C, 2)), 0.3 * jax.random.normal(kb, (L, 2, out)))
    model = eqx.tree_at(lambda m: m.blocks.attn.kv_up, model, wrapped)
    toks = _tokens()
    a, b = _forward(model, toks), _forward(for_inference(model), toks)
    plain = _forward(_model(_cfg()), toks)
    assert float(jnp.abs(a - plain).max()) > 1e-2  # the delta matters
    assert float(jnp.abs(a - b).max()) < 1e-4
