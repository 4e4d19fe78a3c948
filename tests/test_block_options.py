"""Issue 16's block options: qk_norm, activation relu2, logit_softcap, zero_init_proj.

Off (the default) they leave the model exactly as it was; on, each changes the logits the way
its formula says and a short run still learns."""

from __future__ import annotations

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dantinox_eqx.config import MODEL_SHAPE_FIELDS, Config, ConfigError
from dantinox_eqx.model import Transformer

from .conftest import TINY, decode_in_pieces, one_batch_losses
from .data.make_logits_golden import VARIANTS, logits

GOLDEN = Path(__file__).parent / "data" / "logits_3db2249.npz"
OPTIONS = {  # name -> overrides turning the option on (relu2 needs the non-gated MLP)
    "qk_norm": {"qk_norm": True},
    "relu2": {"activation": "relu2", "use_swiglu": False},
    "logit_softcap": {"logit_softcap": 1.0},
    "zero_init_proj": {"zero_init_proj": True},
}
OFF = {"qk_norm": False, "activation": "gelu", "logit_softcap": None, "zero_init_proj": False}


def _model(**kw) -> Transformer:
    return Transformer(Config(**{**TINY, **kw}), key=jax.random.key(0))


def _tokens():
    return jax.random.randint(jax.random.key(1), (2, 16), 0, 37)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_options_off_reproduce_the_logits_of_commit_3db2249(variant):
    """Logits of the code before issue 16 (tests/data/make_logits_golden.py); bitwise equal on
    the machine that wrote them, within float32 round-off on any other."""
    want = np.load(GOLDEN)[variant]
    np.testing.assert_allclose(logits(variant), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_changes_the_logits(name):
    base_kw = {"use_swiglu": False} if name == "relu2" else {}
    base, _ = _model(**base_kw)(_tokens())
    on, _ = _model(**OPTIONS[name])(_tokens())
    assert on.shape == base.shape and bool(jnp.isfinite(on).all())
    assert float(jnp.abs(on - base).max()) > 1e-3


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    """RMSNorm per head: scaling the q and k columns of qkv by 10 leaves the logits unchanged
    with qk_norm (and changes them without)."""
    H, E = TINY["n_heads"], TINY["head_size"]

    def scaled(model):
        return eqx.tree_at(lambda m: m.blocks.attn.qkv.weight, model,
                           model.blocks.attn.qkv.weight.at[..., : 2 * H * E].multiply(10.0))

    normed = _model(qk_norm=True)
    assert normed.blocks.attn.q_norm.scale.shape == (2, E)
    np.testing.assert_allclose(scaled(normed)(_tokens())[0], normed(_tokens())[0], atol=2e-5)
    plain = _model()
    assert float(jnp.abs(scaled(plain)(_tokens())[0] - plain(_tokens())[0]).max()) > 1e-3


def test_relu2_is_relu_squared():
    model = _model(activation="relu2", use_swiglu=False)
    mlp = jax.tree.map(lambda x: x[0] if eqx.is_array(x) else x, model.blocks.mlp)  # layer 0
    x = jax.random.normal(jax.random.key(2), (2, 5, 32))
    want = (jnp.maximum(x @ mlp.up.weight, 0) ** 2) @ mlp.down.weight
    np.testing.assert_allclose(mlp(x)[0], want, rtol=1e-5, atol=1e-6)


def test_logit_softcap_is_cap_tanh_of_the_logits():
    cap = 0.5
    raw, _ = _model()(_tokens())
    capped, _ = _model(logit_softcap=cap)(_tokens())  # same key: same weights
    np.testing.assert_allclose(capped, cap * jnp.tanh(raw / cap), rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(capped).max()) < cap


def test_zero_init_proj_makes_every_block_the_identity():
    model = _model(zero_init_proj=True)
    assert not jnp.any(model.blocks.attn.o.weight) and not jnp.any(model.blocks.mlp.down.weight)
    tokens = _tokens()
    skip = model._logits(model.embed(tokens, jnp.arange(16)))  # no blocks at all
    np.testing.assert_array_equal(model(tokens)[0], skip)
    moe = _model(zero_init_proj=True, use_moe=True)
    assert not jnp.any(moe.blocks.mlp.down.weight)


@pytest.mark.slow
def test_cached_decoding_equals_the_full_forward_with_the_options():
    model = _model(qk_norm=True, logit_softcap=3.0, activation="relu2", use_swiglu=False, kv_heads=2)
    full, _ = model(_tokens())
    np.testing.assert_allclose(decode_in_pieces(model, _tokens(), prefill=9), full, atol=1e-4)


@pytest.mark.parametrize("name", [*OPTIONS, "all"])
@pytest.mark.slow
def test_a_short_run_with_each_option_learns(name):
    kw = {k: v for o in OPTIONS.values() for k, v in o.items()} if name == "all" else OPTIONS[name]
    if name == "logit_softcap":
        kw = {"logit_softcap": 15.0}  # a cap of 1 would bound the loss away from fitting
    losses = one_batch_losses(Config(**{**TINY, **kw, "lr": 3e-3, "warmup_steps": 0, "max_steps": 40}))
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("overrides, message", [
    ({"logit_softcap": 0.0}, "logit_softcap: must be positive"),
    ({"logit_softcap": -30.0}, "logit_softcap: must be positive"),
    ({"activation": "swish"}, "activation: unknown value 'swish'"),
    ({"activation": "relu2"}, "activation: 'relu2' is the non-gated MLP's non-linearity"),  # use_swiglu on
    ({"qk_norm": True, "mla": True}, "qk_norm: not available with mla"),
])
def test_bad_options_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Config(**overrides)


def test_options_default_off():
    assert {k: getattr(Config(), k) for k in OFF} == OFF
    assert "qk_norm" in MODEL_SHAPE_FIELDS  # it adds arrays: resume and fine-tuning keep it
