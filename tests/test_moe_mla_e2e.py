"""MoE and MLA at the product level: Trainer runs, model_summary.json, expert_counts.csv,
Generator on MLA runs, bf16 + grad accumulation, LoRA targets and data parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dantinox_eqx.config import Config
from dantinox_eqx.data.sampling import prepare_data, sample_batch
from dantinox_eqx.data.tokenizer import encode, load_tokenizer
from dantinox_eqx.infer.generate import Generator, generate_ids, naive_generate
from dantinox_eqx.infer.storage import store_weights
from dantinox_eqx.lora import (
    LoRAExpertLinear,
    LoRALinear,
    apply_lora,
    lora_trainable,
    merge_lora,
)
from dantinox_eqx.model import Transformer, expert_counts
from dantinox_eqx.nn.mla import MLAttention, for_inference
from dantinox_eqx.run.pretrained import from_pretrained
from dantinox_eqx.train.expert_log import EXPERT_COUNTS_FILE, columns, read_expert_counts
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, make_train_step
from dantinox_eqx.train.trainer import Trainer, read_log

from .conftest import TINY
from .procs import xla_flags

MOE = dict(use_moe=True, n_experts=4, top_k_mlp=2)
MLA = dict(mla=True, down_dim_q=16, down_dim_kv=12, rope_dim=4)
ROOT = Path(__file__).resolve().parents[1]


def tiny(**kw) -> Config:
    base = {**TINY, "vocab_size": None, "max_steps": 30, "eval_interval": 10, "warmup_steps": 5}
    return Config(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare: Path) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(shakespeare.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return p


def _fit(config: Config, corpus: Path, tmp_path_factory, name: str) -> Path:
    return Trainer(config, progress=False).fit(corpus, run_dir=tmp_path_factory.mktemp(name) / "run")


@pytest.fixture(scope="module")
def moe_run(corpus, tmp_path_factory) -> Path:
    return _fit(tiny(**MOE), corpus, tmp_path_factory, "moe")


@pytest.fixture(scope="module")
def dense_run(corpus, tmp_path_factory) -> Path:
    return _fit(tiny(max_steps=10), corpus, tmp_path_factory, "dense")


@pytest.fixture(scope="module")
def mla_run(corpus, tmp_path_factory) -> Path:
    return _fit(tiny(**MLA), corpus, tmp_path_factory, "mla")


def _summary(run: Path) -> dict:
    return json.loads((run / "model_summary.json").read_text())


# --------------------------------------------------------------------------- balance columns
@pytest.mark.slow
def test_balance_columns_moe_nonzero_dense_zero(moe_run, dense_run):
    rows = read_log(moe_run / "training_log.csv")
    assert [r["step"] for r in rows] == [10, 20, 30]
    # E * sum_e f_e P_e: 1.0 for uniform routing, larger when unbalanced; never ~0.
    assert all(0.95 < r["train_bal"] < 2.0 and 0.95 < r["val_bal"] < 2.0 for r in rows), rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    dense = read_log(dense_run / "training_log.csv")
    assert dense and all(r["train_bal"] == 0.0 and r["val_bal"] == 0.0 for r in dense)
    assert not (dense_run / EXPERT_COUNTS_FILE).exists()


# --------------------------------------------------------------------------- model_summary.json
@pytest.mark.slow
def test_moe_summary_total_and_active_parameters(moe_run):
    cfg = Config.from_yaml(moe_run / "config.yaml")
    s = _summary(moe_run)
    # The formula for this config (rmsnorm: scale only; tied head; SwiGLU experts).
    assert cfg.norm_type == "rmsnorm" and cfg.weight_tying and cfg.use_swiglu and not cfg.shared_expert
    V, D, L, H, E, T = cfg.vocab_size, 32, 2, 4, 8, 16
    X, k, F = 4, 2, 2 * 32
    attn = D * (3 * H * E) + H * E * D  # fused qkv + o
    expert = D * 2 * F + F * D  # SwiGLU up (gate and value) + down
    total = V * D + L * (2 * D + attn + D * X + X * expert) + D  # + final norm
    active = total - L * (X - k) * expert
    assert (s["n_params_total"], s["n_params_active"]) == (total, active)
    assert s["n_params"] == total > active
    assert (V, total, active) == (64, 59808, 35232)  # the numbers for this slice's vocabulary (62 + 2 specials)
    attn_flops = 12 * L * T * H * E
    assert s["flops_per_token"] == 6 * active + attn_flops  # tied head: nothing excluded
    # dropless slot buffers run every expert on every token: executed = all experts
    assert s["moe_dispatch"] == "dropless" and s["moe_expert_rows_per_token"] == X
    assert s["flops_per_token_executed"] == 6 * total + attn_flops
    assert s["kv_cache_bytes_per_token_per_layer"] == s["gqa_kv_cache_bytes_per_token_per_layer"] == 2 * H * E * 4


@pytest.mark.slow
def test_mla_summary_kv_cache_bytes(mla_run):
    cfg = Config.from_yaml(mla_run / "config.yaml")
    s = _summary(mla_run)
    C, R, L, H, E, T = 12, 4, 2, 4, 8, 16
    assert (cfg.down_dim_kv, cfg.rope_dim, cfg.inference) == (C, R, False)
    assert s["kv_cache_dtype"] == "float32"
    assert s["kv_cache_bytes_per_token_per_layer"] == (C + R) * 4 == 64
    assert s["kv_cache_bytes_per_token"] == (C + R) * 4 * L
    assert s["gqa_kv_cache_bytes_per_token_per_layer"] == 2 * H * E * 4 == 256
    assert s["n_params_active"] == s["n_params_total"] == s["n_params"]
    attn_flops = 6 * L * T * H * (2 * E + R)  # scores over E + R dims, values over E
    assert s["flops_per_token"] == s["flops_per_token_executed"] == 6 * s["n_params_matmul"] + attn_flops
    assert "moe_dispatch" not in s


# --------------------------------------------------------------------------- expert_counts.csv
@pytest.mark.slow
def test_expert_counts_file_matches_the_eval_batch(moe_run):
    cfg = Config.from_yaml(moe_run / "config.yaml")
    rows = read_expert_counts(moe_run / EXPERT_COUNTS_FILE)
    header = (moe_run / EXPERT_COUNTS_FILE).read_text().splitlines()[0].split(",")
    assert header == columns(2, 4) and header[1] == "block0_expert0"
    assert [s for s, _ in rows] == [10, 20, 30]
    n_assign = cfg.eval_iters * cfg.batch_size * cfg.max_context * cfg.top_k_mlp
    for _, counts in rows:
        assert counts.shape == (2, 4)
        np.testing.assert_array_equal(counts.sum(1), [n_assign, n_assign])
    # Recompute the last row: the final params on the evaluation's validation batches.
    model = from_pretrained(moe_run, best=False)
    data = prepare_data(Path(json.loads((moe_run / "training_cursor.json").read_text())["data_path"]),
                        tokenizer_type=cfg.tokenizer_type, max_context=cfg.max_context,
                        val_fraction=cfg.val_fraction, max_train_tokens=cfg.max_train_tokens,
                        tokenizer=load_tokenizer(moe_run / "tokenizer.json"))
    eval_key = jax.random.split(jax.random.key(cfg.seed), 4)[3]
    k_val = jax.random.split(jax.random.fold_in(eval_key, 30))[1]
    batches = sample_batch(jnp.asarray(data.val), k_val, cfg.batch_size, cfg.max_context, accum=cfg.eval_iters)
    count = eqx.filter_jit(expert_counts)
    expected = sum(np.asarray(count(model, b[:, :-1])) for b in batches)
    np.testing.assert_array_equal(rows[-1][1], expected)
    assert rows[0][1].tolist() != rows[-1][1].tolist()  # routing moved during training


class _StopAt:
    """A logger that aborts training after the evaluation row of `step` (checkpoint saved)."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, row: dict) -> None:
        if row["step"] == self.step:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_resumed_moe_run_writes_the_same_expert_counts(moe_run, corpus, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny(**MOE), loggers=[_StopAt(20)], progress=False).fit(corpus, run_dir=run)
    assert [s for s, _ in read_expert_counts(run / EXPERT_COUNTS_FILE)] == [10, 20]
    # a row past the checkpoint (as a kill between the log write and the checkpoint leaves)
    with open(run / EXPERT_COUNTS_FILE, "a", encoding="utf-8") as f:
        f.write("25" + ",1" * 8 + "\n")
    Trainer(tiny(**MOE), progress=False).fit(corpus, run_dir=run, resume=True)
    assert (run / EXPERT_COUNTS_FILE).read_text() == (moe_run / EXPERT_COUNTS_FILE).read_text()


# --------------------------------------------------------------------------- MLA generation
def _files(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in run.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_generator_switches_an_mla_run_to_the_absorbed_form(mla_run):
    before = _files(mla_run)
    gen = Generator(mla_run)
    # the Generator decodes with one block per layer (infer/storage.py unstacks the scanned stack)
    assert all(isinstance(block.attn, MLAttention) and block.attn.absorbed is True for block in gen.model.blocks)
    naive = from_pretrained(mla_run, inference=False)
    assert naive.blocks.attn.absorbed is False
    # the same parameter arrays, in the decode layout: the flag changes the computation only
    for a, b in zip(jax.tree.leaves(eqx.filter(gen.model, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(store_weights(naive, "float32"), eqx.is_array)), strict=True):
        np.testing.assert_array_equal(a, b)

    prompt = "ROMEO:"
    text = gen.generate(prompt, max_new_tokens=24, temperature=0.0)  # slides past max_context 16
    ids, _ = generate_ids(naive, [encode(gen.tokenizer, prompt)], 24, temperature=0.0)
    assert len(text) == 24 and text == gen.tokenizer.decode(ids[0].tolist())
    # within the context, also the cache-free full forward of the naive model
    first = naive_generate(naive, encode(gen.tokenizer, prompt), 8)
    assert gen.tokenizer.decode(first) == text[:8]
    assert _files(mla_run) == before  # nothing re-saved or touched


# --------------------------------------------------------------------------- bf16 + grad_accum
@pytest.mark.slow
def test_moe_and_mla_bf16_with_grad_accum_through_trainer(corpus, tmp_path_factory):
    cfg = tiny(**MOE, **MLA, use_bf16=True, grad_accum=2, capacity_factor=1.25, max_steps=4,
               eval_interval=2, eval_iters=1)
    run = _fit(cfg, corpus, tmp_path_factory, "bf16")
    rows = read_log(run / "training_log.csv")
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert all(np.isfinite(r[c]) for c in ("train_loss", "val_loss", "train_bal", "val_bal"))
        assert r["train_bal"] > 0.9 and r["val_bal"] > 0.9
    s = _summary(run)
    assert s["dtype"] == "bfloat16" and s["kv_cache_dtype"] == "bfloat16"
    assert s["kv_cache_bytes_per_token_per_layer"] == (12 + 4) * 2
    # capacity ceil(1.25 * 64 * 2 / 4) = 40 slots per expert for 64 tokens: 4 * 40 / 64 rows
    assert s["moe_dispatch"] == "capacity" and s["moe_expert_rows_per_token"] == 2.5
    assert s["n_params_active"] < s["n_params_total"]
    assert len(read_expert_counts(run / EXPERT_COUNTS_FILE)) == 2
    model = from_pretrained(run, best=False)
    assert model.blocks.mlp.up.weight.dtype == jnp.bfloat16


# --------------------------------------------------------------------------- LoRA targets
def _lora_names(model) -> dict[str, type]:
    is_lora = lambda x: isinstance(x, LoRALinear | LoRAExpertLinear)
    leaves = jax.tree_util.tree_flatten_with_path(model, is_leaf=is_lora)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): type(x) for p, x in leaves if is_lora(x)}


def _train_lora(model, cfg: Config, n: int = 10):
    """n steps on one fixed batch, adapters only; returns (model, losses). Not donated: the
    frozen arrays are shared with the base model."""
    trainable = lora_trainable(model)
    params, static = eqx.partition(model, eqx.is_array)
    opt = make_optimizer(cfg.replace(lr=0.1, warmup_steps=0), n)
    state = init_opt_state(opt, params, trainable)
    step = make_train_step(static, opt, alpha_balance=cfg.alpha_balance, trainable=trainable, donate=False)
    batch = jax.random.randint(jax.random.key(5), (1, 4, 17), 0, 37)
    losses = []
    for i in range(n):
        params, state, m = step(params, state, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    return eqx.combine(params, static), losses


def _check_adapter_training(tuned, fresh) -> None:
    """Every non-adapter array of `tuned` equals `fresh`'s (frozen) and every adapter's B
    moved off zero in every layer (gradients reached it)."""
    fa = jax.tree_util.tree_flatten_with_path(eqx.filter(tuned, eqx.is_array))[0]
    fb = jax.tree.leaves(eqx.filter(fresh, eqx.is_array))
    for (path, x), y in zip(fa, fb, strict=True):
        name = getattr(path[-1], "name", None)
        if name == "lora_b":
            assert bool((jnp.abs(x).reshape(x.shape[0], -1).max(1) > 0).all()), path
        elif name != "lora_a":
            np.testing.assert_array_equal(x, y)


TOKENS = jax.random.randint(jax.random.key(11), (2, 16), 0, 37)
_fwd = eqx.filter_jit(lambda m, t: m(t)[0])


@pytest.mark.slow
def test_lora_attention_on_mla_trains_and_generates_in_both_forms():
    cfg = Config(**{**TINY, **MLA})
    base = Transformer(cfg, key=jax.random.key(0))
    tuned = apply_lora(base, "attention", rank=2, key=jax.random.key(1))
    names = _lora_names(tuned)
    assert set(names) == {f"blocks.attn.{n}" for n in ("q_down", "q_up", "kv_down", "kv_up", "o")}
    tuned, losses = _train_lora(tuned, cfg)
    assert losses[-1] < losses[0] - 0.02, losses
    _check_adapter_training(tuned, apply_lora(base, "attention", rank=2, key=jax.random.key(1)))
    merged = merge_lora(tuned)
    a = _fwd(tuned, TOKENS)
    # 5e-5, not the dense models' 1e-5: the merged weight rounds W + s A B once per element, and
    # MLA's latent RMSNorms (q and kv) scale that rounding up by their small latents' 1 / rms;
    # an AVX2 EPYC read 1.49e-5 on outputs up to 0.3 (8 of 1184 elements past 1e-5)
    np.testing.assert_allclose(_fwd(merged, TOKENS), a, atol=5e-5)
    assert float(jnp.abs(a - _fwd(base, TOKENS)).max()) > 1e-3  # the adapters do something
    # The absorbed (generation) form reads the unmerged adapters too.
    np.testing.assert_allclose(_fwd(for_inference(tuned), TOKENS), a, atol=1e-4)
    prompt = [[1, 2, 3, 4, 5]]
    g1, _ = generate_ids(for_inference(tuned), prompt, 12, temperature=0.0)
    g2, _ = generate_ids(for_inference(merged), prompt, 12, temperature=0.0)
    np.testing.assert_array_equal(g1, g2)


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_lora_mlp_on_moe_adapts_every_expert(shared):
    cfg = Config(**{**TINY, **MOE, "shared_expert": shared})
    base = Transformer(cfg, key=jax.random.key(0))
    tuned = apply_lora(base, "mlp", rank=2, key=jax.random.key(1))
    names = _lora_names(tuned)
    expected = {"blocks.mlp.up": LoRAExpertLinear, "blocks.mlp.down": LoRAExpertLinear}
    if shared:
        expected |= {"blocks.mlp.shared.up": LoRALinear, "blocks.mlp.shared.down": LoRALinear}
    assert names == expected  # the router is never adapted
    up = tuned.blocks.mlp.up
    assert up.lora_a.shape == (2, 4, 32, 2) and up.lora_b.shape == (2, 4, 2, 2 * 2 * 32)  # (L, E, ...)
    np.testing.assert_array_equal(_fwd(tuned, TOKENS), _fwd(base, TOKENS))  # B = 0: unchanged

    tuned, losses = _train_lora(tuned, cfg)
    assert losses[-1] < losses[0] - 0.02, losses
    _check_adapter_training(tuned, apply_lora(base, "mlp", rank=2, key=jax.random.key(1)))
    assert bool((jnp.abs(tuned.blocks.mlp.up.lora_b).max(axis=(2, 3)) > 0).all())  # every expert trained
    merged = merge_lora(tuned)
    np.testing.assert_allclose(_fwd(merged, TOKENS), _fwd(tuned, TOKENS), atol=1e-5)
    # Each expert's adapter acts on that expert only: y[e] = x[e] @ (W[e] + s A[e] B[e]).
    layer = jax.tree.map(lambda x: x[0], tuned.blocks.mlp.up)
    x = jax.random.normal(jax.random.key(2), (4, 6, 32))
    want = jnp.stack([x[e] @ (layer.weight[e] + layer.scale * layer.lora_a[e] @ layer.lora_b[e])
                      for e in range(4)])
    np.testing.assert_allclose(layer(x), want, atol=1e-5)
    # LoRA dropout: the call's key reaches the stacked expert adapters (and only with a key).
    drop = apply_lora(base, "mlp", rank=2, dropout=0.5, key=jax.random.key(1))
    drop = eqx.tree_at(lambda m: m.blocks.mlp.up.lora_b, drop, jnp.ones_like(drop.blocks.mlp.up.lora_b))
    undropped = apply_lora(base, "mlp", rank=2, dropout=0.0, key=jax.random.key(1))  # the same A
    undropped = eqx.tree_at(lambda m: m.blocks.mlp.up.lora_b, undropped, drop.blocks.mlp.up.lora_b)
    np.testing.assert_array_equal(_fwd(drop, TOKENS), _fwd(undropped, TOKENS))
    k = jax.random.key(3)
    assert float(jnp.abs(drop(TOKENS, key=k)[0] - undropped(TOKENS, key=k)[0]).max()) > 1e-4


# --------------------------------------------------------------------------- data parallel
DP_SCRIPT = r"""
import json, sys
import equinox as eqx, jax, jax.numpy as jnp, numpy as np
from dantinox_eqx.parallel import sharding as sh
from dantinox_eqx.config import Config
from dantinox_eqx.model import Transformer
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, make_train_step

assert jax.device_count() == 2
out = {}
# capacity_factor > 0 is where data parallelism could differ (capacity per forward call):
# the sharded step computes the same global forward, so the same tokens are dropped.
for cf, sharded in ((1.25, "dp"), (0.0, "fsdp")):
    cfg = Config(dim=32, n_heads=4, head_size=8, num_blocks=2, vocab_size=37, max_context=16,
                 batch_size=8, grad_accum=2, expansion=2, lr=1e-2, warmup_steps=1, max_steps=3,
                 use_moe=True, n_experts=4, top_k_mlp=2, shared_expert=True, capacity_factor=cf)
    two = [jax.random.randint(jax.random.fold_in(jax.random.key(9), s), (2, 8, 17), 0, 37) for s in range(2)]
    batches = [two[0], two[1], two[0]]
    for mode in ("one", sharded):
        params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
        opt = make_optimizer(cfg, 3)
        state = init_opt_state(opt, params)
        step = make_train_step(static, opt, alpha_balance=cfg.alpha_balance, donate=False)
        if mode != "one":
            mesh = sh.make_mesh(2)
            params, state = sh.place(params, state, mesh, mode)
            step = sh.shard_train_step(step, mesh, params, state, donate=False)
        hist = []
        for s, b in enumerate(batches):
            b = b if mode == "one" else sh.shard_batch(b, mesh, 1)
            params, state, m = step(params, state, b, jax.random.key(s))
            hist.append([float(m["loss"]), float(m["bal"])])
        out[f"{cf}/{mode}"] = {"hist": hist,
                               "params": [np.asarray(x).ravel()[:64].tolist() for x in jax.tree.leaves(params)]}
json.dump(out, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
def test_moe_train_step_on_2_devices_equals_1_device(tmp_path):
    out = tmp_path / "dp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path]),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(2)}
    proc = subprocess.run([sys.executable, "-c", DP_SCRIPT, str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for cf, mode in (("1.25", "dp"), ("0.0", "fsdp")):
        one, other = res[f"{cf}/one"], res[f"{cf}/{mode}"]
        assert one["hist"][2][0] < one["hist"][0][0]  # it trains: batch 0 again, lower loss
        assert all(h[1] > 0.9 for h in one["hist"])
        np.testing.assert_allclose(other["hist"], one["hist"], atol=1e-5, rtol=0)  # loss and bal
        for a, b in zip(other["params"], one["params"], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
