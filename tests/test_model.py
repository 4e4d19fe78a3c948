import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dantinox_eqx.config import Config
from dantinox_eqx.model import Transformer, attend, causal_mask

from .conftest import TINY, decode_in_pieces


def _model(**kw) -> Transformer:
    return Transformer(Config(**{**TINY, **kw}), key=jax.random.key(0))


def _tokens(b=2, t=16, seed=1, vocab=37):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


def test_shapes_and_dtypes():
    logits, bal = _model()(_tokens())
    assert logits.shape == (2, 16, 37) and logits.dtype == jnp.float32
    assert bal.shape == () and float(bal) == 0.0


@pytest.mark.parametrize("kw", [{}, {"kv_heads": 1}, {"use_swiglu": False}, {"weight_tying": False},
                                {"sliding_window": True, "context_window": 4},
                                {"absolute_pos": True, "trainable_pos": True, "use_rotary_pos": False}])
def test_causal_mask_holds(kw):
    model = _model(**kw)
    toks = _tokens()
    base, _ = model(toks)
    t = 9
    changed = toks.at[:, t].set((toks[:, t] + 1) % 37)
    out, _ = model(changed)
    np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
    assert np.abs(np.asarray(out[:, t:] - base[:, t:])).max() > 1e-4


def test_gqa_with_all_kv_heads_is_plain_multi_head_attention():
    """Reference MHA written from scratch (per head, no grouping) vs the grouped kernel."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    B, T, H, E = 2, 5, 4, 8
    q, k, v = (jax.random.normal(kk, (B, T, H, E)) for kk in (k1, k2, k3))
    mask = causal_mask(jnp.arange(T), jnp.arange(T))
    grouped = attend(q.reshape(B, T, H, 1, E), k, v, mask).reshape(B, T, H, E)
    scores = jnp.einsum("bthe,bshe->bhts", q, k) / np.sqrt(E)
    scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf)
    ref = jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(scores, -1), v)
    np.testing.assert_allclose(grouped, ref, atol=1e-5)


def test_gqa_kv_heads_equal_n_heads_matches_repeated_kv():
    """kv_heads=1: every query head reads the same K/V, i.e. MHA with K/V repeated H times."""
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    B, T, H, E = 2, 5, 4, 8
    q = jax.random.normal(k1, (B, T, H, E))
    k, v = jax.random.normal(k2, (B, T, 1, E)), jax.random.normal(k3, (B, T, 1, E))
    mask = causal_mask(jnp.arange(T), jnp.arange(T))
    mqa = attend(q.reshape(B, T, 1, H, E), k, v, mask).reshape(B, T, H, E)
    mha = attend(q.reshape(B, T, H, 1, E), jnp.repeat(k, H, 2), jnp.repeat(v, H, 2), mask).reshape(B, T, H, E)
    np.testing.assert_allclose(mqa, mha, atol=1e-6)
    logits, _ = _model(kv_heads=1)(_tokens())
    assert logits.shape == (2, 16, 37) and bool(jnp.isfinite(logits).all())


@pytest.mark.slow
def test_blocks_are_stacked_and_scanned():
    model = _model(num_blocks=3)
    assert model.blocks.attn.qkv.weight.shape == (3, 32, 96)
    jaxpr = str(jax.make_jaxpr(lambda m, t: m(t))(model, _tokens()))
    assert jaxpr.count("scan[") == 1  # one scanned block, not three inlined copies
    jaxpr8 = str(jax.make_jaxpr(lambda m, t: m(t))(_model(num_blocks=8), _tokens()))
    assert len(jaxpr8) == len(jaxpr)  # program size does not grow with depth


@pytest.mark.slow
def test_kv_cache_equals_full_forward():
    model = _model(kv_heads=2)
    toks = _tokens(t=16)
    full, _ = model(toks)
    np.testing.assert_allclose(decode_in_pieces(model, toks, prefill=7), full, atol=1e-4)


def test_rope_scaling_and_window_off_leave_logits_unchanged():
    toks = _tokens()
    base, _ = _model()(toks)
    same, _ = _model(rope_scale_factor=1.0, sliding_window=False, context_window=3)(toks)
    np.testing.assert_array_equal(base, same)
    wide, _ = _model(sliding_window=True, context_window=16)(toks)  # window >= T: no effect
    np.testing.assert_allclose(wide, base, atol=1e-6)


def test_wrong_shape_is_rejected_readably():
    model = _model()
    with pytest.raises(Exception) as err:  # jaxtyping's TypeCheckError under beartype
        model(jnp.zeros((16,), jnp.int32))
    assert "tokens" in str(err.value) and "B T" in str(err.value)


def test_bf16_cast_keeps_float32_softmax():
    from dantinox_eqx.model import cast_floating

    model = cast_floating(_model(), jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    logits, _ = model(_tokens())
    assert logits.dtype == jnp.bfloat16 and bool(jnp.isfinite(logits.astype(jnp.float32)).all())


@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.slow
def test_unrolled_layers_equal_the_rolled_scan(remat):
    """scan_unroll only changes how XLA runs the layer loop: loss and gradients agree."""
    assert Config(**{**TINY, "num_blocks": 3}).effective_scan_unroll == 3  # auto: unrolled
    rolled = _model(num_blocks=3, scan_unroll=1, remat=remat)
    unrolled = _model(num_blocks=3, remat=remat)  # same key: same weights

    def loss(m, t):
        return m(t)[0].astype(jnp.float32).std()

    l1, g1 = eqx.filter_value_and_grad(loss)(rolled, _tokens())
    l3, g3 = eqx.filter_value_and_grad(loss)(unrolled, _tokens())
    np.testing.assert_allclose(l1, l3, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g3)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _reference_attention(q, k, v, mask):
    """Plain softmax attention differentiated by JAX (what `attend`'s custom backward replaces)."""
    s = jnp.einsum("btkge,bske->bkgts", q, k) / np.sqrt(q.shape[-1])
    mask = mask if mask.ndim == 2 else mask[:, None, None]
    p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1)
    return jnp.einsum("bkgts,bske->btkge", p, v)


@pytest.mark.parametrize("batched_mask", [False, True])
@pytest.mark.slow
def test_attention_backward_equals_autodiff(batched_mask):
    B, T, K, G, E = 2, 7, 2, 3, 8
    kq, kk, kv, kg = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(kq, (B, T, K, G, E))
    k, v = jax.random.normal(kk, (B, T, K, E)), jax.random.normal(kv, (B, T, K, E))
    cot = jax.random.normal(kg, (B, T, K, G, E))
    pos = jnp.arange(T)
    if batched_mask:  # left padding: sequence 1's first two slots are empty (fully masked rows)
        kpos = jnp.stack([pos, jnp.where(pos < 2, -1, pos)])
        mask = causal_mask(jnp.broadcast_to(pos, (B, T)), kpos, window=4, sink=True)
    else:
        mask = causal_mask(pos, pos)
    out, vjp = jax.vjp(lambda *a: attend(*a, mask), q, k, v)
    ref, ref_vjp = jax.vjp(lambda *a: _reference_attention(*a, mask), q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    for got, want in zip(vjp(cot), ref_vjp(cot)):
        np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("window", [None, 40])
def test_causal_blocks_equal_the_whole_attention(window):
    """attend_causal skips the key blocks later than each query block: same values and
    gradients as attend over the whole mask (T = 150 in blocks of 64: two full ones, a short one)."""
    from dantinox_eqx.nn.attention import attend_causal

    B, T, K, G, E = 2, 150, 2, 3, 16
    kq, kk, kv, kg = jax.random.split(jax.random.key(4), 4)
    q = jax.random.normal(kq, (B, T, K, G, E))
    k, v = jax.random.normal(kk, (B, T, K, E)), jax.random.normal(kv, (B, T, K, E))
    cot = jax.random.normal(kg, (B, T, K, G, E))
    pos = jnp.arange(T) + 3  # increasing positions, not necessarily from 0
    mask = causal_mask(pos, pos, window=window)
    def value_and_vjp(f):
        return jax.jit(lambda q, k, v, c: (f(q, k, v), jax.vjp(f, q, k, v)[1](c)))(q, k, v, cot)

    out, grads = value_and_vjp(lambda *a: attend_causal(*a, mask, block=64))
    ref, ref_grads = value_and_vjp(lambda *a: attend(*a, mask))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_backward_is_the_rotation_back(dtype):
    """rope's hand-written backward (a rotation by -angle) equals autodiff of the rotate-half
    formula, at shared (T,) and per-row (B, T) positions (packed windows restart them)."""
    from dantinox_eqx.nn.rope import rope

    def reference(x, pos, base):
        half = x.shape[-1] // 2
        angles = pos.astype(jnp.float32)[..., None] / base ** (jnp.arange(half, dtype=jnp.float32) / half)
        cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]
        x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)

    kx, kg = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kx, (2, 50, 3, 16)).astype(dtype)
    cot = jax.random.normal(kg, x.shape).astype(dtype)
    def value_and_grad(f, pos):  # positions traced, as a decode step's: both compute their tables alike
        return jax.jit(lambda x, pos: (f(x, pos, 500.0), jax.vjp(lambda x: f(x, pos, 500.0), x)[1](cot)[0]))(x, pos)

    for pos in (jnp.arange(50), jnp.arange(100).reshape(2, 50) % 37):
        (out, grad), (ref, ref_grad) = value_and_grad(rope, pos), value_and_grad(reference, pos)
        assert out.dtype == grad.dtype == dtype
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=1e-6)
        np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(ref_grad, np.float32), atol=1e-6)


def test_rotary_tables_from_known_positions_equal_the_traced_ones():
    """Known positions (a full forward's) get host-computed constant tables; traced ones (decoding,
    packed windows) computed in the program: the same angles' cos and sin to a few float32 ulps."""
    from dantinox_eqx.nn.rope import rotary_tables

    pos = jnp.arange(4096)
    for base in (10000.0, 5e5):
        host = rotary_tables(pos, 32, base)
        traced = jax.jit(lambda p, base=base: rotary_tables(p, 32, base))(pos)
        assert not isinstance(host[0], jax.core.Tracer) and host[0].shape == (4096, 32)
        for a, b in zip(host, traced):
            np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_gelu_backward_equals_autodiff():
    from dantinox_eqx.model import gelu

    x = jnp.linspace(-8.0, 8.0, 4001)
    np.testing.assert_array_equal(gelu(x), jax.nn.gelu(x))
    np.testing.assert_allclose(jax.grad(lambda x: gelu(x).sum())(x),
                               jax.grad(lambda x: jax.nn.gelu(x).sum())(x), atol=2e-6)
    xb = x.astype(jnp.bfloat16)
    assert jax.grad(lambda x: gelu(x).astype(jnp.float32).sum())(xb).dtype == jnp.bfloat16


@pytest.mark.parametrize("kw", [{}, {"kv_heads": 2}, {"sliding_window": True, "context_window": 5, "no_sink": True}])
@pytest.mark.slow
def test_fused_attention_equals_plain(kw):
    """attention_impl fused (jax.nn.dot_product_attention: cuDNN on GPUs, XLA here) computes what
    the einsum path does, forward and backward; auto picks plain on CPU."""
    plain, fused = _model(attention_impl="plain", **kw), _model(attention_impl="fused", **kw)
    assert not _model(**kw).blocks.attn._fused(jnp.bfloat16, False)  # auto on CPU: plain
    assert fused.blocks.attn._fused(jnp.float32, False) and not fused.blocks.attn._fused(jnp.float32, True)

    def loss(m):
        return m(_tokens())[0].std()

    (lp, gp), (lf, gf) = eqx.filter_value_and_grad(loss)(plain), eqx.filter_value_and_grad(loss)(fused)
    np.testing.assert_allclose(plain(_tokens())[0], fused(_tokens())[0], atol=1e-5)
    np.testing.assert_allclose(lp, lf, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gf)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
