"""Packed windows with document masks and the per-token loss mask (issue 23, items 1-2)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dantinox_eqx.config import Config
from dantinox_eqx.model import Transformer, segment_positions
from dantinox_eqx.train.step import STARTS, TRAINED, document_flags, make_eval_step, make_train_step, masked_sums

from .conftest import TINY

# float32 throughout. A packed window runs the same per-token arithmetic as the example alone:
# the masked-out keys get exp(-1e30 - max) = 0 exactly, so what differs is only how XLA tiles
# GEMMs and reductions of a different length T (reordered float32 sums: ~1e-7 relative per op,
# a few ulp after 2 blocks on logits of order 1), so 1e-5 holds on AVX2 and AVX-512 alike.
ATOL = 1e-5
GQA = dict(TINY, n_heads=4, kv_heads=2, max_context=32)


def _model(**kw):
    cfg = Config(**{**GQA, **kw})
    return cfg, Transformer(cfg, key=jax.random.key(0))


def _examples(lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 37, n).astype(np.int32) for n in lengths]


def _packed(examples, width):
    """tokens (1, width) and flags: each example starts a segment; the rest is padding, a
    segment of its own. Everything after an example's first token is trained."""
    tokens, flags = np.zeros(width, np.int32), np.zeros(width, np.int32)
    at = 0
    for ex in examples:
        tokens[at:at + len(ex)] = ex
        flags[at] = STARTS
        flags[at + 1:at + len(ex)] = TRAINED
        at += len(ex)
    flags[at] = STARTS  # padding: its own segment, untrained
    return tokens[None], flags[None]


def test_segment_positions_restart_at_each_example():
    seg = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 1, 2, 3]])


@pytest.mark.parametrize("extra", [{}, {"sliding_window": True, "context_window": 3}])
@pytest.mark.slow
def test_packed_logits_equal_each_example_alone(extra):
    _, model = _model(**extra)
    examples = _examples([5, 9, 4, 7])
    tokens, flags = _packed(examples, 28)
    segments = np.cumsum((flags & STARTS) > 0, axis=-1)
    packed, _ = model(jnp.asarray(tokens), segment_ids=jnp.asarray(segments))
    at = 0
    for ex in examples:
        alone, _ = model(jnp.asarray(ex)[None])
        np.testing.assert_allclose(packed[0, at:at + len(ex)], alone[0], atol=ATOL)
        at += len(ex)
    # and the mask matters: without segments the later examples read the earlier ones
    plain, _ = model(jnp.asarray(tokens))
    assert float(jnp.abs(plain[0, 5:14] - packed[0, 5:14]).max()) > 1e-3


@pytest.mark.slow
def test_masked_loss_is_token_weighted_mean_of_example_losses():
    _, model = _model()
    examples = _examples([6, 11, 3, 8])
    tokens, flags = _packed(examples, 32)
    ce, count, _ = masked_sums(model, (jnp.asarray(tokens), jnp.asarray(flags)))
    losses, counts = [], []
    for ex in examples:
        logits, _ = model(jnp.asarray(ex)[None, :-1])
        losses.append(float(optax.softmax_cross_entropy_with_integer_labels(logits[0], ex[1:]).mean()))
        counts.append(len(ex) - 1)
    assert int(count) == sum(counts)
    np.testing.assert_allclose(float(ce / count), np.average(losses, weights=counts), rtol=1e-6)
    # unequal weights: the plain mean of the example means is another number
    assert abs(float(ce / count) - np.mean(losses)) > 1e-4


def _chat_batch(rows, width, seed):
    """rows windows of `width` tokens, each one example: a prompt of random length then an
    answer of random (uneven) length trained, the rest padding (untrained)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 37, (rows, width)).astype(np.int32)
    flags = np.zeros((rows, width), np.int32)
    flags[:, 0] = STARTS
    for r in range(rows):
        prompt, answer = rng.integers(2, 6), rng.integers(1, width - 6)
        flags[r, prompt:prompt + answer] = TRAINED
        flags[r, min(prompt + answer, width - 1)] |= STARTS  # padding after the answer
    return tokens, flags


def _params_static(model):
    return eqx.partition(model, eqx.is_array)


@pytest.mark.slow
def test_accumulation_1x8_equals_4x2_with_uneven_answers():
    _, model = _model()
    params, static = _params_static(model)
    sgd = optax.sgd(1.0)
    step = make_train_step(static, sgd, donate=False)
    tokens, flags = _chat_batch(8, 17, seed=3)
    counts = (flags[:, 1:] & TRAINED).sum(1)
    assert len(set(counts.reshape(4, 2).sum(1))) > 1  # the micro-batches hold different counts
    one = step(params, sgd.init(params), (tokens[None], flags[None]), jax.random.key(0))
    four = step(params, sgd.init(params), (tokens.reshape(4, 2, 17), flags.reshape(4, 2, 17)), jax.random.key(0))
    # Same sums of float32 terms in another grouping (per micro-batch, then across): ~1e-7
    # relative on gradients of order 1e-2, times lr 1 -> far under 1e-6 on the parameters.
    for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(four[0])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(one[2]["loss"], four[2]["loss"], rtol=1e-6)
    # the loss is the token mean over the whole batch, not the mean of the micro-batch means
    ce, count, _ = masked_sums(model, (jnp.asarray(tokens), jnp.asarray(flags)))
    np.testing.assert_allclose(one[2]["loss"], ce / count, rtol=1e-6)
    means = [float(jnp.divide(*masked_sums(model, (jnp.asarray(tokens[i:i + 2]), jnp.asarray(flags[i:i + 2])))[:2]))
             for i in range(0, 8, 2)]
    assert abs(float(four[2]["loss"]) - np.mean(means)) > 1e-4


@pytest.mark.slow
def test_prompt_only_perturbation_leaves_gradient_unchanged():
    _, model = _model()
    params, static = _params_static(model)
    grad = jax.jit(jax.grad(lambda p, b: jnp.divide(*masked_sums(eqx.combine(p, static), b)[:2])))
    # one window: example A (prompt 4, answer 5), then a prompt-only example B (untrained),
    # then the first 4 prompt tokens of example C, cut by the window's end
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 37, (1, 20)).astype(np.int32)
    flags = np.zeros((1, 20), np.int32)
    flags[0, [0, 9, 16]] = STARTS
    flags[0, 4:9] = TRAINED
    base = grad(params, (tokens, flags))
    leaves = lambda g: jax.tree.leaves(g)
    for lo, hi in [(9, 16), (16, 20)]:  # B's tokens; C's prompt
        other = tokens.copy()
        other[0, lo:hi] = (other[0, lo:hi] + 1 + rng.integers(0, 35, hi - lo)) % 37
        for a, b in zip(leaves(base), leaves(grad(params, (other, flags)))):
            np.testing.assert_array_equal(a, b)  # no path from them to the loss: bitwise
    answer = tokens.copy()
    answer[0, 6] = (answer[0, 6] + 1) % 37  # an answer token: the gradient moves
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(leaves(base), leaves(grad(params, (answer, flags))))) > 1e-6


@pytest.mark.slow
def test_document_mask_from_end_of_text():
    _, model = _model()
    params, static = _params_static(model)
    eot = 36
    docs = [d % 36 for d in _examples([6, 9, 5])]  # no eot inside a document
    window = np.concatenate([np.append(d, eot) for d in docs]).astype(np.int32)[None]  # 23 tokens
    flags = document_flags(jnp.asarray(window), eot)
    starts = np.flatnonzero(np.asarray(flags[0]) & STARTS)
    np.testing.assert_array_equal(starts, [7, 17])  # after each end-of-text
    loss = make_eval_step(static, doc_sep=eot)(params, window[None])["loss"]
    losses, counts = [], []
    for d in docs:  # each document with its end-of-text, alone; its first token is not a target
        ex = np.append(d, eot)
        logits, _ = model(jnp.asarray(ex)[None, :-1])
        losses.append(float(optax.softmax_cross_entropy_with_integer_labels(logits[0], ex[1:]).mean()))
        counts.append(len(ex) - 1)
    np.testing.assert_allclose(float(loss), np.average(losses, weights=counts), rtol=1e-5)


_SHARDED = """
import sys, jax, numpy as np, optax, equinox as eqx
sys.path.insert(0, {root!r})
from tests.test_packing import _model, _params_static, _chat_batch
from dantinox_eqx.parallel import sharding
from dantinox_eqx.train.step import make_train_step
assert jax.device_count() == 4
_, model = _model()
params, static = _params_static(model)
sgd = optax.sgd(1.0)
step = make_train_step(static, sgd, donate=False)
tokens, flags = _chat_batch(8, 17, seed=3)
batch = (tokens.reshape(2, 4, 17), flags.reshape(2, 4, 17))
one = step(params, sgd.init(params), jax.device_put(batch, jax.devices()[0]), jax.random.key(0))
mesh = sharding.make_mesh(4)
p, o = sharding.place(params, sgd.init(params), mesh)
four = step(p, o, sharding.shard_batch(batch, mesh, 1), jax.random.key(0))
print(float(one[2]["loss"]), float(four[2]["loss"]))
for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(four[0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
print("OK")
"""


@pytest.mark.slow
def test_masked_loss_is_over_the_all_device_batch():
    """4 devices, each a quarter of every micro-batch holding different numbers of trained
    tokens: the step equals the one-device step (the sums are global; atol as in the 1 x 8 test)."""
    import subprocess
    import sys
    from pathlib import Path

    from .procs import device_env

    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", _SHARDED.format(root=root)], env=device_env(4),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
