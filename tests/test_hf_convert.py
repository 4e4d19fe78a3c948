"""Hugging Face conversion without transformers: the new config fields' defaults, exact round
trips through a Hugging Face folder per family, the documented layouts, sharded folders, and every
refusal (Python and CLI). tests/test_hf.py checks the same files against transformers itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from dantinox_eqx.config import MODEL_SHAPE_FIELDS, Config
from dantinox_eqx.model import Transformer, rope_base
from dantinox_eqx.run.hf import IMPORT_FILE, HFFormatError, export_hf, from_hf, hf_model_type, import_hf, to_hf
from dantinox_eqx.train.trainer import Trainer

from .hf_runs import FAMILY_CONFIGS, SHAPE, TEXT, arrays, family_model, family_run, logits, special_tokenizer, tokens
from .procs import assert_one_line_refusals

EXE = Path(sys.executable).parent / "dantinox-eqx"
MODEL_TYPES = {"llama": "llama", "llama_untied_gqa_biased": "llama", "qwen2": "qwen2", "mistral": "mistral",
               "mixtral": "mixtral", "gpt2": "gpt2", "gpt2_untied_biased": "gpt2"}
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([str(EXE), *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- new config fields
@pytest.mark.parametrize("kw", [{"kv_heads": 2, "weight_tying": False, "rope_scale_factor": 2.0},
                                {"use_moe": True, "shared_expert": True, **FAMILY_CONFIGS["gpt2"]},
                                {"mla": True, "down_dim_q": 16, "down_dim_kv": 16, "rope_dim": 8}])
def test_new_config_fields_default_to_todays_model(kw):
    """norm_eps 1e-6, RoPE base 10000 (then rope_scale_factor), width expansion * dim and no
    biases: the defaults build the very model the explicit old values build, with no new arrays."""
    cfg = Config(**SHAPE, vocab_size=37, **kw)
    assert (cfg.norm_eps, cfg.rope_theta, cfg.mlp_hidden, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == (
        1e-6, None, None, False, False, False)
    explicit = cfg.replace(norm_eps=1e-6, rope_theta=10000.0, mlp_hidden=cfg.expansion * cfg.dim)
    a, b = Transformer(cfg, key=jax.random.key(0)), Transformer(explicit, key=jax.random.key(0))
    assert a.norm.eps == 1e-6 and cfg.mlp_width == 64
    if not cfg.mla and cfg.use_rotary_pos:
        assert a.blocks.attn.rope_base == rope_base(8, cfg.rope_scale_factor) == b.blocks.attn.rope_base
    assert not any("bias" in n and "norm" not in n for n in arrays(a))  # no qkv/o/mlp bias arrays
    assert arrays(a).keys() == arrays(b).keys()
    toks = tokens(37)
    np.testing.assert_array_equal(logits(a, toks), logits(b, toks))


def test_new_config_fields_change_the_model():
    cfg = Config(**SHAPE, vocab_size=37)
    toks, base = tokens(37), None
    for field, value in (("norm_eps", 1e-2), ("rope_theta", 500.0)):
        model = Transformer(cfg.replace(**{field: value}), key=jax.random.key(0))
        base = logits(Transformer(cfg, key=jax.random.key(0)), toks) if base is None else base
        assert float(np.abs(logits(model, toks) - base).max()) > 1e-4, field
    biased = arrays(Transformer(cfg.replace(qkv_bias=True, o_bias=True, mlp_bias=True, mlp_hidden=40),
                                key=jax.random.key(0)))
    assert {k: v.shape for k, v in biased.items() if "bias" in k and "norm" not in k} == {
        "blocks.attn.qkv_bias": (2, 96), "blocks.attn.o_bias": (2, 32), "blocks.mlp.up_bias": (2, 80),
        "blocks.mlp.down_bias": (2, 32)}
    assert biased["blocks.mlp.down.weight"].shape == (2, 40, 32)
    for field in ("qkv_bias", "o_bias"):
        with pytest.raises(ValueError, match=f"^{field}: multi-head latent"):
            Config(**SHAPE, mla=True, **{field: True})
    with pytest.raises(ValueError, match="^mlp_bias: MoE"):
        Config(**SHAPE, use_moe=True, mlp_bias=True)


# --------------------------------------------------------------------------- round trips and layouts
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_round_trip_through_a_hf_folder_is_exact(tmp_path, family):
    tok = special_tokenizer()
    cfg, model = family_model(family, tok)
    out = to_hf(model, cfg, tok, tmp_path / "hf", special_tokens=SPECIAL)
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == MODEL_TYPES[family]
    assert hf["eos_token_id"] == tok.token_to_id("</s>") and hf["bos_token_id"] == tok.token_to_id("<s>")
    back, cfg2, tok2 = from_hf(out)
    assert arrays(back).keys() == arrays(model).keys()  # GPT-2's zero biases are dropped again
    got = arrays(back)
    for name, value in arrays(model).items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    # Same arrays and every field the forward pass reads: the same logits.
    same = [f for f in MODEL_SHAPE_FIELDS if f not in ("expansion", "mlp_hidden")] + ["max_context",
        "mlp_width", "norm_eps", "activation", "use_rotary_pos", "sliding_window", "no_sink", "context_window",
        "top_k_mlp", "capacity_factor"]
    assert {f: getattr(cfg2, f) for f in same} == {f: getattr(cfg, f) for f in same}
    if cfg.use_rotary_pos:  # one base on the Hugging Face side: theta * s^(E / (E - 2))
        assert cfg2.effective_rope_theta == rope_base(8, cfg.rope_scale_factor, cfg.effective_rope_theta)
        assert cfg2.rope_scale_factor == 1.0
    assert tok2.to_str() == tok.to_str()


def test_documented_layouts(tmp_path):
    """The module docstring's table, tensor by tensor, for llama (untied, GQA, biased), mixtral
    experts and GPT-2's (in, out) Conv1D."""
    tok = special_tokenizer()
    cfg, model = family_model("llama_untied_gqa_biased", tok)
    t = load_file(to_hf(model, cfg, tok, tmp_path / "llama") / "model.safetensors")
    ours, p = arrays(model), "model.layers.1."
    qkv, up = ours["blocks.attn.qkv.weight"][1], ours["blocks.mlp.up.weight"][1]  # H E = 32, K E = 16, F = 40
    np.testing.assert_array_equal(t[p + "self_attn.q_proj.weight"], qkv[:, :32].T)
    np.testing.assert_array_equal(t[p + "self_attn.k_proj.weight"], qkv[:, 32:48].T)
    np.testing.assert_array_equal(t[p + "self_attn.v_proj.weight"], qkv[:, 48:].T)
    np.testing.assert_array_equal(t[p + "self_attn.v_proj.bias"], ours["blocks.attn.qkv_bias"][1][48:])
    np.testing.assert_array_equal(t[p + "self_attn.o_proj.weight"], ours["blocks.attn.o.weight"][1].T)
    np.testing.assert_array_equal(t[p + "mlp.gate_proj.weight"], up[:, :40].T)
    np.testing.assert_array_equal(t[p + "mlp.up_proj.weight"], up[:, 40:].T)
    np.testing.assert_array_equal(t[p + "mlp.down_proj.weight"], ours["blocks.mlp.down.weight"][1].T)
    np.testing.assert_array_equal(t["lm_head.weight"], ours["head.weight"].T)
    np.testing.assert_array_equal(t[p + "post_attention_layernorm.weight"], ours["blocks.mlp_norm.scale"][1])
    hf = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert hf["rope_theta"] == hf["rope_parameters"]["rope_theta"] == 50000.0 * 2.0 ** (8 / 6)
    assert (hf["rms_norm_eps"], hf["intermediate_size"], hf["num_key_value_heads"], hf["head_dim"]) == (1e-5, 40, 2, 8)
    assert (hf["attention_bias"], hf["mlp_bias"], hf["tie_word_embeddings"]) == (True, True, False)

    cfg, model = family_model("mixtral", tok)
    t, ours = load_file(to_hf(model, cfg, tok, tmp_path / "mix") / "model.safetensors"), arrays(model)
    e = "model.layers.0.block_sparse_moe."
    np.testing.assert_array_equal(t[e + "gate.weight"], ours["blocks.mlp.router.weight"][0].T)
    np.testing.assert_array_equal(t[e + "experts.3.w1.weight"], ours["blocks.mlp.up.weight"][0, 3][:, :64].T)
    np.testing.assert_array_equal(t[e + "experts.3.w3.weight"], ours["blocks.mlp.up.weight"][0, 3][:, 64:].T)
    np.testing.assert_array_equal(t[e + "experts.3.w2.weight"], ours["blocks.mlp.down.weight"][0, 3].T)

    cfg, model = family_model("gpt2", tok)
    t, ours = load_file(to_hf(model, cfg, tok, tmp_path / "gpt2") / "model.safetensors"), arrays(model)
    np.testing.assert_array_equal(t["transformer.h.0.attn.c_attn.weight"], ours["blocks.attn.qkv.weight"][0])
    np.testing.assert_array_equal(t["transformer.wpe.weight"], ours["pos_embedding"])
    np.testing.assert_array_equal(t["transformer.h.1.ln_2.bias"], ours["blocks.mlp_norm.bias"][1])
    assert not np.any(t["transformer.h.0.mlp.c_fc.bias"]) and "lm_head.weight" not in t  # no biases, tied


def _shard(folder: Path) -> list[str]:
    """Split folder/model.safetensors into two shards with their index (as transformers writes)."""
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    for file, part in zip(files, halves):
        save_file({n: tensors[n] for n in part}, folder / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in zip(files, halves) for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    return files


def test_sharded_folder_imports_and_a_missing_shard_is_named(tmp_path):
    tok = special_tokenizer()
    cfg, model = family_model("mixtral", tok)
    folder = to_hf(model, cfg, tok, tmp_path / "hf")
    files = _shard(folder)
    back = from_hf(folder).model
    got = arrays(back)
    for name, value in arrays(model).items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    (folder / files[1]).unlink()
    with pytest.raises(HFFormatError, match=f"^model.safetensors.index.json: shard '{files[1]}' is missing"):
        import_hf(folder, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _edit_config(folder: Path, **changes) -> None:
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, **changes}))


def test_import_refusals_name_the_file_or_field_and_write_nothing(tmp_path):
    tok = special_tokenizer()
    cfg, model = family_model("llama", tok)
    good = to_hf(model, cfg, tok, tmp_path / "good")
    cases = {
        "no_config": (lambda f: (f / "config.json").unlink(), "^config.json: .* has none"),
        "bert": (lambda f: _edit_config(f, model_type="bert"), "^config.json: model_type 'bert' is not supported"),
        "shape": (lambda f: _edit_config(f, intermediate_size=48),
                  r"^model.safetensors: tensor 'model.layers.0.mlp.down_proj.weight' has shape \(32, 64\), "
                  r"config.json implies \(32, 48\)"),
        "rope": (lambda f: _edit_config(f, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}),
                 "^config.json: rope_parameters.rope_type is 'llama3'"),
        "untied": (lambda f: _edit_config(f, tie_word_embeddings=False),
                   "^model.safetensors: tensor 'lm_head.weight' is missing"),
        "no_tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "^tokenizer.json: .* has none"),
    }
    for name, (damage, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for p in good.iterdir():
            (folder / p.name).write_bytes(p.read_bytes())
        damage(folder)
        with pytest.raises(HFFormatError, match=message):
            import_hf(folder, tmp_path / f"run_{name}")
        assert not (tmp_path / f"run_{name}").exists(), name
    cfg, model = family_model("qwen2", tok)  # q/k/v biases in a folder that claims llama without them
    _edit_config(to_hf(model, cfg, tok, tmp_path / "biased"), model_type="llama")
    with pytest.raises(HFFormatError, match="^model.safetensors: tensor 'model.layers.0.self_attn.k_proj.bias' has no "
                                            "place in the llama model"):
        import_hf(tmp_path / "biased", tmp_path / "run_biased")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="^RUN_DIR: .* is not empty"):
        import_hf(good, taken)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


@pytest.mark.parametrize("field,kw", [
    ("mla", dict(mla=True, down_dim_q=16, down_dim_kv=16, rope_dim=8)),
    ("no_sink", dict(sliding_window=True)),
    ("capacity_factor", dict(use_moe=True, capacity_factor=1.25)),
    ("shared_expert", dict(use_moe=True, shared_expert=True)),
    ("trainable_pos", dict(absolute_pos=True, use_rotary_pos=False)),
    ("use_rotary_pos", dict(norm_type="layernorm", use_swiglu=False)),
    ("use_swiglu", dict(use_swiglu=False)),
    ("use_rotary_pos", dict(use_rotary_pos=False)),
    ("o_bias", dict(o_bias=True)),
    ("mlp_bias", dict(qkv_bias=True, mlp_bias=True)),
    ("kv_heads", dict(FAMILY_CONFIGS["gpt2"], kv_heads=2)),
    ("qkv_bias", dict(use_moe=True, qkv_bias=True)),
    ("qk_norm", dict(qk_norm=True)),
    ("logit_softcap", dict(logit_softcap=30.0)),
    ("activation", dict(norm_type="layernorm", absolute_pos=True, trainable_pos=True, use_rotary_pos=False,
                        use_swiglu=False, activation="relu2")),
])
def test_export_refuses_what_hugging_face_cannot_express(field, kw):
    with pytest.raises(HFFormatError, match=f"^{field}: "):
        hf_model_type(Config(**SHAPE, vocab_size=37, **kw))


@pytest.mark.slow
def test_import_fine_tune_export_keeps_the_tokenizer_byte_for_byte(tmp_path):
    """A pretty-printed Hugging Face tokenizer.json (as transformers writes it) survives import,
    a LoRA fine-tune (Trainer) and export unchanged; the special tokens travel through init_from."""
    tok = special_tokenizer()
    cfg, model = family_model("qwen2", tok, max_context=16)
    folder = to_hf(model, cfg, tok, tmp_path / "hf", special_tokens=SPECIAL)
    original = tok.to_str(pretty=True).encode()
    (folder / "tokenizer.json").write_bytes(original)
    run = import_hf(folder, tmp_path / "run")
    assert (run / "tokenizer.json").read_bytes() == original
    assert json.loads((run / IMPORT_FILE).read_text())["special_tokens"] == SPECIAL
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40)
    ft_cfg = Config.from_yaml(run / "config.yaml").replace(
        use_lora=True, init_from=str(run), lora_targets="all", lora_rank=4, max_steps=6, batch_size=4,
        eval_interval=3, eval_iters=1, warmup_steps=0, lr=1e-2)
    ft = Trainer(ft_cfg).fit(corpus, tmp_path / "ft")
    assert (ft / "tokenizer.json").read_bytes() == original
    out = export_hf(ft, tmp_path / "out")
    assert (out / "tokenizer.json").read_bytes() == original
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert (tc["eos_token"], tc["bos_token"], tc["model_max_length"]) == ("</s>", "<s>", 16)
    hf = json.loads((out / "config.json").read_text())
    assert hf["eos_token_id"] == tok.token_to_id("</s>") and hf["model_type"] == "qwen2"
    # The LoRA adapters trained (B left zero) and are merged into the exported weights.
    merged = from_hf(out).model
    assert any(not np.array_equal(arrays(merged)[n], v) for n, v in arrays(model).items())


@pytest.mark.slow
def test_cli_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path):
    tok = special_tokenizer()
    cfg, model = family_model("llama", tok)
    good = to_hf(model, cfg, tok, tmp_path / "good")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    shape = tmp_path / "shape"
    sharded = tmp_path / "sharded"
    for folder in (shape, sharded):
        folder.mkdir()
        for p in good.iterdir():
            (folder / p.name).write_bytes(p.read_bytes())
    _edit_config(shape, num_key_value_heads=2)
    (sharded / _shard(sharded)[0]).unlink()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    mla_run, _ = family_run(tmp_path / "mla_run", "llama", tok, mla=True, down_dim_q=16, down_dim_kv=16, rope_dim=8)
    llama_run, _ = family_run(tmp_path / "llama_run", "llama", tok)
    cases = [(("import-hf", no_config, tmp_path / "r1"), "config.json", tmp_path / "r1"),
             (("import-hf", bert, tmp_path / "r2"), "model_type 'bert'", tmp_path / "r2"),
             (("import-hf", shape, tmp_path / "r3"), "'model.layers.0.self_attn.k_proj.weight' has shape",
              tmp_path / "r3"),
             (("import-hf", sharded, tmp_path / "r4"), "shard 'model-00001-of-00002.safetensors' is missing",
              tmp_path / "r4"),
             (("import-hf", good, taken), "RUN_DIR", None),
             (("export", mla_run, tmp_path / "o1", "--format", "hf"), "mla:", tmp_path / "o1"),
             (("export", llama_run, taken, "--format", "hf"), "is not empty", None)]
    assert_one_line_refusals(cli, cases)
    assert [p.name for p in taken.iterdir()] == ["x"]
    assert yaml.safe_load((mla_run / "config.yaml").read_text())["mla"] is True  # inputs untouched
