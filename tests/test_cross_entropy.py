"""Chunked cross-entropy (nn/cross_entropy.py) equals the plain one, and never holds the logits;
the unchunked path's hand-written backward equals autodiff's.

Tolerance, 1e-6 relative, float32 (eps = 6e-8): every token's logits are the same dot products
in both paths and its loss the same ops, so the per-token values agree to a few ulps; what
differs is the order of the sums. The loss is a sum of positive terms (no cancellation): a
different order moves it by at most ~(log2 chunk + n_chunks) eps ~ 1e-7 relative here. The
gradients are compared in norm (max |difference| / max |value|): the head's gradient sums
N per-token outer products chunk by chunk instead of in one GEMM, which changes each element
by a few eps of the largest terms, ~1e-7 of the largest element; elements that cancel to near
zero have no meaningful relative error of their own.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dantinox_eqx.config import Config
from dantinox_eqx.model import Transformer
from dantinox_eqx.nn.cross_entropy import _sum_tile, auto_chunk, chunked_cross_entropy, plain_cross_entropy
from dantinox_eqx.train.step import loss_fn

from .conftest import TINY

RTOL = 1e-6


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    assert np.abs(a - b).max() / scale <= rtol, (np.abs(a - b).max() / scale)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk", [64, None])
@pytest.mark.parametrize("V", [700, 1024])
def test_chunked_equals_plain_loss_and_gradients(softcap, weighted, chunk, V):
    """chunk 64: 150 = 2 chunks + 22 rows, the padding is exercised; chunk None: the logits
    whole, the backward by hand (`_whole`), against `plain_cross_entropy` left to autodiff.
    V 1024: the sums of exponentials in tiles of 256 (`_sum_tile`); 700: one sum per row.

    One wider bound: d hidden of the chunks, 2e-6. Each of its elements sums V terms
    (softmax - onehot) x head that cancel to a small total, in GEMMs of 64 rows vs 150: at V 1024
    0.7-1.07e-6 of the largest element over four seeds, with the tiles or without them; at V 700
    1.22e-6 on an AVX2-only EPYC (XLA compiles for the host: other kernels, other sum orders)."""
    assert _sum_tile(V) == {700: None, 1024: 256}[V]
    N, D = 150, 24
    kh, kw, kt, km = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(kh, (N, D))
    head = 0.3 * jax.random.normal(kw, (D, V))
    targets = jax.random.randint(kt, (N,), 0, V)
    weights = jax.random.bernoulli(km, 0.7, (N,)).astype(jnp.float32) if weighted else None

    def mean(f):
        return lambda h, w: (lambda s: s[0] / s[1])(f(h, w, targets, weights))

    plain = jax.value_and_grad(mean(lambda *a: plain_cross_entropy(*a, softcap=softcap)), (0, 1))
    chunked = jax.value_and_grad(mean(lambda *a: chunked_cross_entropy(*a, chunk, softcap=softcap)), (0, 1))
    (lp, (gh_p, gw_p)), (lc, (gh_c, gw_c)) = jax.jit(plain)(hidden, head), jax.jit(chunked)(hidden, head)
    np.testing.assert_allclose(lc, lp, rtol=RTOL)
    _close(gh_c, gh_p, 2e-6 if chunk == 64 else RTOL)
    _close(gw_c, gw_p)
    # the weight sums agree exactly, and masked tokens carry no gradient
    if weighted:
        s_c, w_c = chunked_cross_entropy(hidden, head, targets, weights, chunk)
        assert float(w_c) == float(weights.sum())
        assert float(jnp.abs(gh_c[weights == 0]).max()) == 0.0
        # the per-token weights' gradient (each token's loss / weight_sum, less the mean's share)
        grad_w = lambda f: jax.jit(jax.grad(lambda w: (lambda s: s[0] / s[1])(f(hidden, head, targets, w))))(weights)
        _close(grad_w(lambda *a: chunked_cross_entropy(*a, chunk, softcap=softcap)),
               grad_w(lambda *a: plain_cross_entropy(*a, softcap=softcap)))
    # without differentiation (evaluation) too
    value = lambda f: float(jax.jit(lambda h, w: f(h, w, targets, weights)[0])(hidden, head))
    np.testing.assert_allclose(value(lambda *a: chunked_cross_entropy(*a, chunk, softcap=softcap)),
                               value(lambda *a: plain_cross_entropy(*a, softcap=softcap)), rtol=RTOL)


@pytest.mark.parametrize("kw", [dict(weight_tying=False), dict(weight_tying=True, logit_softcap=3.0)])
@pytest.mark.slow
def test_model_loss_and_gradients_equal_unchunked(kw):
    """The training loss of a tiny model with a larger vocabulary: chunks of 16 tokens vs none."""
    batch = jax.random.randint(jax.random.key(1), (3, 17), 0, 512)  # 48 tokens: 3 chunks of 16

    def grads(chunk):  # the same key: the same weights, only the loss's chunking differs
        cfg = Config(**{**TINY, "vocab_size": 512, "dropout_rate": 0.1, "loss_chunk": chunk, **kw})
        params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
        f = lambda p: loss_fn(eqx.combine(p, static), batch, jax.random.key(2))[0]
        return jax.jit(jax.value_and_grad(f))(params)

    (l_plain, g_plain), (l_chunk, g_chunk) = grads(-1), grads(16)
    np.testing.assert_allclose(l_chunk, l_plain, rtol=RTOL)
    # 2e-6: every parameter's gradient is computed from d hidden, whose chunked sums cancel
    # (test above: up to 1.22e-6 there); here a norm scale's read 1.017e-6 on an AVX2 EPYC
    for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_plain)):
        _close(a, b, 2e-6)


def test_chunked_gradient_never_holds_the_logits():
    """XLA's own accounting of the compiled gradient: the plain program's temporaries hold the
    (N, V) float32 logits (and more); the chunked one's stay under one chunk's logits plus the
    head's gradient, far below N * V * 4 bytes."""
    N, D, V, chunk = 2048, 16, 8192, 128
    hidden, head = jnp.ones((N, D)), jnp.ones((D, V))
    targets = jnp.zeros((N,), jnp.int32)

    def temp_bytes(f):
        g = jax.jit(jax.grad(lambda h, w: f(h, w)[0], (0, 1)))
        return g.lower(hidden, head).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = N * V * 4
    assert temp_bytes(lambda h, w: plain_cross_entropy(h, w, targets, None)) >= logits_bytes
    assert temp_bytes(lambda h, w: chunked_cross_entropy(h, w, targets, None, chunk)) < logits_bytes / 4


def test_auto_chunk():
    assert auto_chunk(12 * 64, 65) is None  # the baby shape: plain
    assert auto_chunk(8 * 256, 49152) == 1024  # 400 MB of logits: chunked
    assert auto_chunk(8 * 256, 49152, -1) is None and auto_chunk(100, 10, 32) == 32


def test_a_frozen_head_gets_no_gradient_matmul():
    """Under LoRA the head is frozen: the chunked pass then computes the logits and d hidden
    only (2 matmuls per chunk), as the plain backward would; 3 when the head is trained."""
    hidden, head = jnp.ones((64, 8)), jnp.ones((8, 32))
    targets = jnp.zeros((64,), jnp.int32)
    for chunk in (16, None):  # chunked, and the logits whole with the backward by hand
        f = lambda h, w: chunked_cross_entropy(h, w, targets, None, chunk)[0]
        dots = lambda argnums: jax.jit(jax.grad(f, argnums)).lower(hidden, head).as_text().count("dot_general")
        assert dots(0) == 2 and dots((0, 1)) == 3, chunk


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_bfloat16_by_hand_equals_autodiff(softcap):
    """Mixed precision: bfloat16 features and logits, the softmax in float32. The hand-written
    backward rounds d logits to bfloat16 as autodiff's transpose of the cast does; what differs
    is XLA's freedom to skip a rounding (excess precision) in one program and not the other, so
    the bound is bfloat16's: 1e-2 of the largest element (eps 7.8e-3; measured 0-4.2e-3 over four
    seeds; the loss within 2e-5)."""
    N, D, V = 150, 24, 1024
    kh, kw, kt = jax.random.split(jax.random.key(3), 3)
    hidden = jax.random.normal(kh, (N, D)).astype(jnp.bfloat16)
    head = 0.3 * jax.random.normal(kw, (D, V))
    targets = jax.random.randint(kt, (N,), 0, V)
    grads = lambda f: jax.jit(jax.value_and_grad(lambda h, w: f(h, w, targets, None)[0] / N, (0, 1)))(hidden, head)
    (lb, (gh_b, gw_b)), (la, (gh_a, gw_a)) = (grads(lambda *a: chunked_cross_entropy(*a, None, softcap=softcap)),
                                              grads(lambda *a: plain_cross_entropy(*a, softcap=softcap)))
    assert gh_b.dtype == jnp.bfloat16 and gw_b.dtype == jnp.float32
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-4)
    _close(gh_b, gh_a, 1e-2)
    _close(gw_b, gw_a, 1e-2)
