"""Weight storage for generation (infer/storage.py, nn/quant.py): bfloat16 and int8 weights.

Tolerances come from the formats: a bfloat16 weight is w(1 + d) with |d| <= 2^-9 (8 significant
bits, round to nearest); an int8 weight is off by at most half its column's scale, absmax / 254.
The activations enter the matmul as two rows of the weight's dtype (nn/quant.py), off by at most
2^-17 |x| (bfloat16 hi + lo) or max|x| / (2 * 127 * 254) (two int8 rows). For one matmul that
bounds every output exactly: |x' @ W' - x @ W| <= |x| @ |W' - W| + |x' - x| @ |W'|, plus the
float32 rounding of the sums (~K eps |x| @ |W|, K = d_in). Through a whole model the errors
of the stacked matmuls add to first order, so the logits move by far less than the gap between
the best two tokens on the prompts below, and the greedy tokens are float32's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dantinox_eqx.config import Config, ConfigError
from dantinox_eqx.infer.generate import Generator, generate_ids
from dantinox_eqx.infer.storage import store_weights
from dantinox_eqx.model import Transformer, unstack_blocks
from dantinox_eqx.nn.linear import Linear
from dantinox_eqx.nn.quant import Bfloat16Linear, Int8Linear, split_bfloat16, split_int8

from .conftest import TINY

EPS = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_one_matmul_within_the_formats_bound(weights):
    lin = Linear(64, 48, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 64))
    if weights == "int8":
        stored = Int8Linear.quantize(lin.weight)
        assert stored.q.dtype == jnp.int8 and stored.q.shape == (64, 48) and stored.scale.shape == (48,)
        w_err = jnp.broadcast_to(stored.scale / 2, (64, 48))
        x_err = jnp.broadcast_to(jnp.abs(x).max(-1, keepdims=True) / (2 * 127 * 254), x.shape)
    else:
        stored = Bfloat16Linear.store(lin.weight)
        assert stored.w.dtype == jnp.bfloat16 and stored.w.shape == (64, 48)
        w_err = jnp.abs(lin.weight) * 2.0**-9
        x_err = jnp.abs(x) * 2.0**-17
    bound = (jnp.abs(x) @ w_err + x_err @ jnp.abs(stored.weight)
             + 64 * EPS * (jnp.abs(x) @ jnp.abs(lin.weight)))
    diff = jnp.abs(stored(x) - lin(x))
    assert bool(jnp.all(diff <= bound)), float(jnp.max(diff - bound))
    assert float(diff.max()) > 0  # the storage really changed the weights


@pytest.mark.parametrize("kw", [dict(weight_tying=True), dict(weight_tying=False, kv_heads=2)])
@pytest.mark.slow
def test_logits_within_the_formats_bound_and_greedy_tokens_kept(kw):
    """Teacher-forced on float32's greedy continuation: the stored model's logits stay within the
    bound, and its greedy token is float32's wherever float32's best-two gap exceeds twice the
    bound (there no rounding of that size can swap them). A random tiny model has many near
    ties, so where the gap is smaller the tokens may differ, as they may for any two CPUs."""
    model = Transformer(Config(**{**TINY, "max_context": 32, **kw}), key=jax.random.key(0))
    prompt = [1, 5, 9, 2, 30]
    ref = generate_ids(model, [prompt], 20, temperature=0.0)[0]
    seq = jnp.asarray([prompt + ref[0].tolist()])
    ref_logits = np.asarray(model(seq)[0][0])
    top2 = -np.sort(-ref_logits, axis=-1)[:, :2]
    for weights, u in (("bfloat16", 2.0**-9), ("int8", 1 / 254)):
        stored = store_weights(model, weights)
        if kw["weight_tying"]:
            assert stored.head is not None  # the tied head gets its own stored copy
        logits = np.asarray(stored(seq)[0][0])
        # first order, each of the 2 L + 1 matmuls on a token's path moves the logits by at most u
        # of their scale; 4x that for the norms' amplification
        bound = 4 * (2 * model.num_blocks + 1) * u * float(np.abs(ref_logits).max())
        drift = float(np.abs(logits - ref_logits).max())
        assert 0 < drift <= bound, (weights, drift, bound)
        sure = (top2[:, 0] - top2[:, 1]) > 2 * bound
        assert (logits.argmax(-1)[sure] == ref_logits.argmax(-1)[sure]).all(), weights
        assert sure.sum() >= 1


@pytest.mark.slow
def test_generator_weights_option_and_bad_value():
    from dantinox_eqx.data.tokenizer import char_tokenizer

    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz .,\n!?;:'-ABCDE")
    model = Transformer(Config(**{**TINY, "vocab_size": tok.get_vocab_size()}), key=jax.random.key(0))
    texts = {w: Generator.from_model(model, tok, weights=w).generate("abc", 12, temperature=0.0)
             for w in ("float32", "bfloat16", "int8")}
    assert len(texts["float32"]) > 0 and texts["bfloat16"] == texts["float32"] and texts["int8"] == texts["float32"]
    with pytest.raises(ConfigError, match="weights: unknown value 'int4'"):
        Generator.from_model(model, tok, weights="int4")


def test_activation_rows_split_within_their_bound():
    """The two int8 rows of each activation row (scales applied) and the bfloat16 hi + lo
    reproduce it within the bounds the matmul tests use; the int8 rows use -127..127 only."""
    x = jax.random.normal(jax.random.key(2), (5, 64)) * jnp.array([1.0, 1e-3, 30.0, 0.0, 1.0])[:, None]
    q, s = split_int8(x)
    assert q.dtype == jnp.int8 and q.shape == (10, 64) and s.shape == (10, 1)
    assert int(jnp.abs(q.astype(jnp.int32)).max()) <= 127
    back = q[:5] * s[:5] + q[5:] * s[5:]
    err = jnp.abs(back - x)
    assert bool(jnp.all(err <= jnp.abs(x).max(-1, keepdims=True) / (2 * 127 * 254) * (1 + 1e-5)))
    assert float(jnp.abs(q[:5] * s[:5] - x).max()) > float(err.max())  # the second row helps
    hl = split_bfloat16(x).astype(jnp.float32)
    assert bool(jnp.all(jnp.abs(hl[:5] + hl[5:] - x) <= jnp.abs(x) * 2.0**-17))


@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (2, 9, 64)])  # one decoded row, a few, a prefill
def test_stored_matmuls_equal_the_dot_of_the_split_rows(shape):
    """int8: the int32 dot is exact, so y == (the split rows' value) @ (q * scale) up to float32
    rounding of the sums; bfloat16 likewise with hi + lo. Leading axes are kept."""
    lin = Linear(64, 48, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), shape)
    rows = x.reshape(-1, 64)
    bound = 2 * 64 * EPS * (jnp.abs(rows) @ jnp.abs(lin.weight))
    q8 = Int8Linear.quantize(lin.weight)
    xq, xs = split_int8(rows)
    n = rows.shape[0]
    want = (xq[:n] * xs[:n] + xq[n:] * xs[n:]) @ q8.weight
    got = q8(x)
    assert got.shape == (*shape[:-1], 48) and got.dtype == jnp.float32
    assert bool(jnp.all(jnp.abs(got.reshape(-1, 48) - want) <= bound))
    bf = Bfloat16Linear.store(lin.weight)
    hl = split_bfloat16(rows).astype(jnp.float32)
    want = (hl[:n] + hl[n:]) @ bf.weight
    assert bool(jnp.all(jnp.abs(bf(x).reshape(-1, 48) - want) <= bound))


@pytest.mark.slow
def test_stored_models_are_unstacked_and_decode_as_float32():
    """store_weights("float32") changes only the layout (one Block per layer, the same
    arrays): logits within float32 rounding of the stacked model's (XLA may order the sums of
    the unrolled layers differently: a few ulps of the logits' scale through 2 blocks), the
    same greedy tokens."""
    model = Transformer(Config(**{**TINY, "max_context": 32}), key=jax.random.key(0))
    stored = store_weights(model, "float32")
    assert isinstance(stored.blocks, tuple) and len(stored.blocks) == model.num_blocks == stored.num_blocks
    assert stored.head is None and stored.embedding is model.embedding  # no copy of the tied head
    assert unstack_blocks(stored) is stored
    prompt = [1, 5, 9, 2, 30]
    ids, logits = generate_ids(model, [prompt], 12, temperature=0.0, return_logits=True)
    ids_s, logits_s = generate_ids(stored, [prompt], 12, temperature=0.0, return_logits=True)
    assert ids_s.tolist() == ids.tolist()
    assert np.abs(logits_s - logits).max() <= 1e-5 * np.abs(logits).max()
    seq = jnp.asarray([prompt + ids[0].tolist()])
    assert np.abs(np.asarray(stored(seq)[0]) - np.asarray(model(seq)[0])).max() <= 1e-5 * np.abs(logits).max()
    assert isinstance(stored.init_cache(2), tuple)
