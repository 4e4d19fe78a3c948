"""LoRA: identity at init, only the adapter trains, merged == unmerged, counts, errors."""

import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dantinox_eqx.config import Config, ConfigError
from dantinox_eqx.data.sampling import prepare_data, sample_batch
from dantinox_eqx.lora import (
    LoRALinear,
    adapter_params,
    apply_lora,
    has_lora,
    load_adapter,
    lora_summary,
    lora_trainable,
    merge_lora,
)
from dantinox_eqx.model import Linear, Transformer
from dantinox_eqx.run import checkpoint
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, loss_fn, make_eval_step, make_train_step

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
TOKENS = jax.random.randint(jax.random.key(7), (2, 16), 0, 37)


@eqx.filter_jit
def _fwd(model) -> jax.Array:
    """Logits on TOKENS, jitted (an eager scan would recompile on every call)."""
    return model(TOKENS)[0]


def _base(**kw) -> Transformer:
    return Transformer(Config(**{**TINY, **kw}), key=jax.random.key(0))


def _lora_modules(model) -> dict[str, LoRALinear]:
    leaves = jax.tree_util.tree_flatten_with_path(model, is_leaf=lambda x: isinstance(x, LoRALinear))[0]
    return {checkpoint._name(p): x for p, x in leaves if isinstance(x, LoRALinear)}


def _perturb_b(model, scale: float = 0.1, seed: int = 3):
    """Every lora_b set to random normal values, so the adapters change the output."""
    mods = list(_lora_modules(model).values())
    keys = jax.random.split(jax.random.key(seed), len(mods))
    new = [scale * jax.random.normal(k, m.lora_b.shape) for m, k in zip(mods, keys)]
    return eqx.tree_at(lambda mdl: [m.lora_b for m in _lora_modules(mdl).values()], model, new)


def _arrays(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in checkpoint.flatten(eqx.filter(tree, eqx.is_array)).items()}


# --------------------------------------------------------------------------- surgery
@pytest.mark.parametrize("targets, adapted", [
    ("attention", {"blocks.attn.qkv", "blocks.attn.o"}),
    ("mlp", {"blocks.mlp.up", "blocks.mlp.down"}),
    ("all", {"blocks.attn.qkv", "blocks.attn.o", "blocks.mlp.up", "blocks.mlp.down"}),
])
@pytest.mark.slow
def test_targets_and_identity_at_init(targets, adapted):
    base = _base()
    tuned = apply_lora(base, targets, rank=4, key=jax.random.key(1))
    mods = _lora_modules(tuned)
    assert set(mods) == adapted
    qkv = mods.get("blocks.attn.qkv")
    if qkv is not None:  # stacked: one adapter per block, A random, B zero
        assert qkv.lora_a.shape == (2, 32, 4) and qkv.lora_b.shape == (2, 4, 96)
        assert float(jnp.abs(qkv.lora_a).min()) >= 0 and float(jnp.abs(qkv.lora_a).max()) > 0
        assert not np.any(np.asarray(qkv.lora_b)) and qkv.scale == 16.0 / 4
    # B = 0: the adapted model computes exactly the base model's logits.
    np.testing.assert_array_equal(_fwd(tuned), _fwd(base))
    # The base weights keep their names and values.
    base_arrays, tuned_arrays = _arrays(base), _arrays(tuned)
    for name, value in base_arrays.items():
        np.testing.assert_array_equal(tuned_arrays[name], value)
    assert set(tuned_arrays) - set(base_arrays) == {f"{a}.lora_{x}" for a in adapted for x in "ab"}


@pytest.mark.slow
def test_merged_equals_unmerged_and_leaves_a_plain_model():
    base = _base()
    tuned = _perturb_b(apply_lora(base, "all", rank=4, alpha=8.0, key=jax.random.key(1)))
    unmerged = _fwd(tuned)
    assert float(jnp.abs(unmerged - _fwd(base)).max()) > 1e-2  # the adapters matter
    merged = merge_lora(tuned)
    assert not has_lora(merged) and not _lora_modules(merged)
    assert isinstance(merged.blocks.attn.qkv, Linear) and isinstance(merged.blocks.mlp.down, Linear)
    # Same structure and names as a model never adapted.
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    diff = float(jnp.abs(_fwd(merged) - unmerged).max())
    assert diff < 1e-5, diff
    # merge_weights is the seed's API: W + (alpha / r) A @ B.
    qkv = tuned.blocks.attn.qkv
    expected = qkv.weight + 2.0 * jnp.einsum("lir,lro->lio", qkv.lora_a, qkv.lora_b)
    np.testing.assert_allclose(qkv.merge_weights(), expected, atol=1e-6)
    # The KV-cached path sees the adapters too.
    cache = tuned.init_cache(2)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    cached, _ = eqx.filter_jit(lambda m, c: m.decode(TOKENS, positions, c))(tuned, cache)
    np.testing.assert_allclose(cached, unmerged, atol=1e-5)


def test_lora_trainable_marks_only_the_factors():
    tuned = apply_lora(_base(), "attention", rank=4, key=jax.random.key(1))
    params, _ = eqx.partition(tuned, eqx.is_array)
    mask = lora_trainable(tuned)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    flags = {checkpoint._name(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert {k for k, v in flags.items() if v} == {"blocks.attn.qkv.lora_a", "blocks.attn.qkv.lora_b",
                                                  "blocks.attn.o.lora_a", "blocks.attn.o.lora_b"}
    assert not any(jax.tree.leaves(lora_trainable(_base())))  # a plain model trains nothing


def _train(model, cfg, data, steps, trainable, seed):
    """`steps` AdamW steps on random windows of data.train; returns (params, static, val loss
    before, val loss after) with the val loss on 32 fixed windows of data.val."""
    params, static = eqx.partition(model, eqx.is_array)
    opt = make_optimizer(cfg, steps)
    opt_state = init_opt_state(opt, params, trainable)
    step = make_train_step(static, opt, trainable=trainable, donate=False)
    evaluate = make_eval_step(static)
    val_batches = sample_batch(jnp.asarray(data.val), jax.random.key(99), 8, 32, accum=4)
    loss0 = float(evaluate(params, val_batches)["loss"])
    train = jnp.asarray(data.train)
    for s in range(steps):
        batch = sample_batch(train, jax.random.fold_in(jax.random.key(seed), s), 8, 32)
        params, opt_state, _ = step(params, opt_state, batch, jax.random.key(s))
    return params, static, loss0, float(evaluate(params, val_batches)["loss"])


@pytest.mark.slow
def test_fine_tuning_moves_only_the_adapter_and_lowers_the_loss(small_corpus):
    # A LoRA on a random base cannot lower the loss much: the frozen tied embedding bounds the
    # logits (|logit| <= |e_v| |norm(h)| ~ 0.02 sqrt(D) sqrt(D) = 0.64). So first train the base
    # briefly (full fine-tuning), then fine-tune only the adapter, as a user would.
    data = prepare_data(small_corpus, tokenizer_type="char", max_context=32)
    cfg = Config(**{**TINY, "vocab_size": data.vocab_size, "max_context": 32, "lr": 1e-2,
                    "warmup_steps": 5})
    params, static, _, pre_loss = _train(Transformer(cfg, key=jax.random.key(0)), cfg, data, 100, None, 3)
    model = apply_lora(eqx.combine(params, static), "all", rank=8, key=jax.random.key(1))
    before = _arrays(model)
    params, _, loss0, loss1 = _train(model, cfg.replace(lr=3e-2), data, 160, lora_trainable(model), 5)
    assert loss0 == pytest.approx(pre_loss, abs=1e-6)  # B = 0: the adapter starts as the identity
    assert loss1 < loss0 - 0.08, (loss0, loss1)  # measured: 3.069 -> 2.94 (CPU)
    # Base weights bitwise unchanged; every A and B moved.
    after = _arrays(params)
    assert set(after) == set(before)
    for name, old in before.items():
        if name.endswith(("lora_a", "lora_b")):
            assert np.abs(after[name] - old).max() > 1e-4, name
        else:
            np.testing.assert_array_equal(after[name], old, err_msg=name)


# --------------------------------------------------------------------------- counts
def _expected_attention_adapter(cfg: Config, rank: int) -> int:
    """r (d_in + d_out) per adapted Linear: qkv is D -> (H + 2K) E, o is H E -> D."""
    H, K, E, D = cfg.n_heads, cfg.effective_kv_heads, cfg.head_size, cfg.dim
    return cfg.num_blocks * rank * ((D + (H + 2 * K) * E) + (H * E + D))


def _expected_base(cfg: Config) -> int:
    D, F, V = cfg.dim, cfg.expansion * cfg.dim, cfg.vocab_size
    H, K, E = cfg.n_heads, cfg.effective_kv_heads, cfg.head_size
    up = D * F * (2 if cfg.use_swiglu else 1)
    block = 2 * D + D * (H + 2 * K) * E + H * E * D + up + F * D  # two RMSNorm scales
    return V * D + cfg.num_blocks * block + D + (0 if cfg.weight_tying else D * V)


@pytest.mark.slow
def test_trainable_share_rank8_attention():
    """The seed: "with lora_rank=8 and lora_targets="attention", only ~0.1-0.5 % of parameters
    are trained". Default config (dim 128, 4 blocks): 24,576 of 820,480 = 3.00 %. The original's
    default size (Config(): dim 512, 12 blocks): 294,912 of 50,672,640 = 0.58 %."""
    default = Config.from_yaml(ROOT / "configs" / "default_config.yaml").replace(vocab_size=65)
    concrete = lora_summary(apply_lora(Transformer(default, key=jax.random.key(0)), key=jax.random.key(1)))
    abstract = lora_summary(eqx.filter_eval_shape(
        lambda: apply_lora(Transformer(default, key=jax.random.key(0)), key=jax.random.key(1))))
    assert concrete == abstract
    adapter = _expected_attention_adapter(default, 8)
    assert adapter == 4 * 8 * (128 + 384 + 128 + 128) == 24_576
    assert concrete["trainable"] == adapter
    assert concrete["total"] == _expected_base(default) + adapter == 820_480
    assert math.isclose(concrete["percent"], 100 * 24_576 / 820_480)  # 2.995 %
    print(f"\ndefault_config.yaml: {concrete}")

    original = Config(vocab_size=65)  # dim 512, 16 heads x 32, 12 blocks, SwiGLU, tied head
    big = lora_summary(eqx.filter_eval_shape(
        lambda: apply_lora(Transformer(original, key=jax.random.key(0)), key=jax.random.key(1))))
    assert big["trainable"] == _expected_attention_adapter(original, 8) == 294_912
    assert big["total"] == _expected_base(original) + 294_912 == 50_672_640
    assert 0.5 < big["percent"] < 0.6  # 0.582 %: the seed's "~0.1-0.5 %" at its own default size
    print(f"Config() defaults: {big}")


def test_optimizer_state_is_twice_the_adapter():
    cfg = Config(**TINY)
    model = apply_lora(Transformer(cfg, key=jax.random.key(0)), "attention", rank=4, key=jax.random.key(1))
    params, _ = eqx.partition(model, eqx.is_array)
    opt = make_optimizer(cfg, 100)  # clip_by_global_norm -> adamw (mu, nu, counts)
    adapter = lora_summary(model)["trainable"]
    assert adapter == _expected_attention_adapter(cfg, 4)

    def sizes(state):
        leaves = jax.tree.leaves(state)
        return sum(x.size for x in leaves if x.ndim > 0), [x.shape for x in leaves if x.ndim == 0]

    lora_size, lora_scalars = sizes(init_opt_state(opt, params, lora_trainable(model)))
    full_size, full_scalars = sizes(init_opt_state(opt, params))
    assert lora_size == 2 * adapter  # first and second moments of A and B, nothing else
    assert full_size == 2 * lora_summary(model)["total"]
    assert lora_scalars == full_scalars and len(lora_scalars) <= 3  # step counters only


# --------------------------------------------------------------------------- adapters and dropout
def test_adapter_checkpoint_round_trip(tmp_path):
    tuned = _perturb_b(apply_lora(_base(), "attention", rank=4, key=jax.random.key(1)))
    adapter = adapter_params(tuned)
    flat = checkpoint.flatten(adapter)
    assert sorted(flat) == ["blocks.attn.o.lora_a", "blocks.attn.o.lora_b",
                            "blocks.attn.qkv.lora_a", "blocks.attn.qkv.lora_b"]
    checkpoint.save(tmp_path, checkpoint.BEST, 3, adapter)
    fresh = apply_lora(_base(), "attention", rank=4, key=jax.random.key(42))  # other A, B = 0
    _, restored, _ = checkpoint.restore(tmp_path, checkpoint.BEST, adapter_params(fresh))
    loaded = load_adapter(fresh, restored)
    np.testing.assert_array_equal(_fwd(loaded), _fwd(tuned))


def test_load_adapter_rejects_a_mismatch():
    adapter = adapter_params(apply_lora(_base(), "attention", rank=4, key=jax.random.key(1)))
    with pytest.raises(ConfigError, match="^lora_rank"):
        load_adapter(apply_lora(_base(), "attention", rank=2, key=jax.random.key(1)), adapter)
    with pytest.raises(ConfigError, match="^lora_targets"):
        load_adapter(apply_lora(_base(), "all", rank=4, key=jax.random.key(1)), adapter)
    with pytest.raises(ConfigError, match="^use_lora"):
        load_adapter(_base(), adapter)


@pytest.mark.slow
def test_lora_dropout_needs_a_key_and_then_acts():
    tuned = _perturb_b(apply_lora(_base(), "all", rank=4, dropout=0.5, key=jax.random.key(1)))
    plain = _perturb_b(apply_lora(_base(), "all", rank=4, dropout=0.0, key=jax.random.key(1)))
    # Without keys (eval, generation) LoRA dropout is the identity.
    np.testing.assert_array_equal(_fwd(tuned), _fwd(plain))
    # With the call's key= (training) it acts: the model's own dropout is the same for both
    # (same key), so the differences are the adapters' dropout alone.
    keyed = lambda m, k: m(TOKENS, key=jax.random.key(k))[0]
    a, b = keyed(tuned, 0), keyed(tuned, 1)
    assert float(jnp.abs(a - keyed(plain, 0)).max()) > 1e-3 and float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_array_equal(a, keyed(tuned, 0))
    # Gradients flow to the factors through the keyed (training) forward.
    params, static = eqx.partition(tuned, eqx.is_array)
    train, frozen = eqx.partition(params, lora_trainable(tuned))

    def loss(t):
        m = eqx.combine(t, frozen, static)
        return loss_fn(m, jnp.concatenate([TOKENS, TOKENS[:, :1]], axis=1), jax.random.key(2))[0]

    grads = jax.grad(loss)(train)
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
    assert len(norms) == 8 and all(np.isfinite(norms)) and min(norms) > 0


# --------------------------------------------------------------------------- errors
class _NoLinears(eqx.Module):
    scale: jax.Array


def test_bad_inputs_raise_config_errors_naming_the_field():
    base = _base()
    key = jax.random.key(1)
    with pytest.raises(ConfigError, match="^lora_targets: unknown"):
        apply_lora(base, "ffn", key=key)
    no_mlp = eqx.tree_at(lambda m: m.blocks.mlp, base, _NoLinears(jnp.ones((2, 3))))
    with pytest.raises(ConfigError, match="^lora_targets: 'mlp' matches no Linear"):
        apply_lora(no_mlp, "mlp", key=key)
    for rank in (0, -3):
        with pytest.raises(ConfigError, match="^lora_rank: must be a positive"):
            apply_lora(base, rank=rank, key=key)
    # qkv is 32 x 96: rank 33 exceeds min(d_in, d_out) = 32.
    with pytest.raises(ConfigError, match=r"^lora_rank: 33 exceeds .* blocks\.attn\.qkv \(weight 32 x 96\)"):
        apply_lora(base, rank=33, key=key)
    apply_lora(base, rank=32, key=key)  # the largest valid rank
    # The MLP down projection is 64 -> 32 and up 32 -> 128: min is 32 everywhere here.
    with pytest.raises(ConfigError, match=r"blocks\.mlp\.up \(weight 32 x 128\)"):
        apply_lora(base, "mlp", rank=40, key=key)
    for alpha in (0.0, -1.0):
        with pytest.raises(ConfigError, match="^lora_alpha"):
            apply_lora(base, alpha=alpha, key=key)
    with pytest.raises(ConfigError, match="^lora_dropout"):
        apply_lora(base, dropout=1.0, key=key)
    with pytest.raises(ConfigError, match="^use_lora: the model already has LoRA"):
        apply_lora(apply_lora(base, key=key), key=key)


# --------------------------------------------------------------------------- other blocks
_VARIANTS = {
    "mla": ("dantinox_eqx.nn.mla", dict(mla=True, down_dim_q=16, down_dim_kv=16, rope_dim=4)),
    "mla-absorbed": ("dantinox_eqx.nn.mla", dict(mla=True, inference=True, down_dim_q=16, down_dim_kv=16,
                                              rope_dim=4)),
    "moe": ("dantinox_eqx.nn.moe", dict(use_moe=True, n_experts=4, top_k_mlp=2)),
}


@pytest.mark.parametrize("variant", sorted(_VARIANTS))
@pytest.mark.slow
def test_other_blocks_adapt_generically(variant):
    _, kw = _VARIANTS[variant]
    base = _base(**kw)
    tuned = apply_lora(base, "all", rank=2, key=jax.random.key(1))
    mods = _lora_modules(tuned)
    assert any(name.startswith("blocks.attn.") for name in mods)
    assert not any("router" in name for name in mods)  # the MoE router is never adapted
    assert all(not np.any(np.asarray(m.lora_b)) for m in mods.values())  # B = 0: a zero update
    # Identity at init up to float32 rounding, not bitwise: the adapter's (zero) GEMMs change
    # the compiled graph, and XLA's CPU fusions around the MLA latent projection (kv_down, then
    # kv_norm) then round differently (measured: 6e-8, 1 ulp at these logits; exact for
    # dense attention and MoE). The adapted kv_down alone, jitted, is bitwise the base Linear.
    np.testing.assert_allclose(_fwd(tuned), _fwd(base), rtol=0, atol=1e-6)
    tuned = _perturb_b(tuned)
    merged = merge_lora(tuned)
    assert not has_lora(merged)
    np.testing.assert_allclose(_fwd(merged), _fwd(tuned), atol=1e-5)
    # The cached path (MLA's absorbed form included) must see the adapters as well.
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    decode = eqx.filter_jit(lambda m: m.decode(TOKENS, positions, m.init_cache(2))[0])
    a, b = decode(tuned), decode(merged)
    np.testing.assert_allclose(a, b, atol=1e-5)
