"""LoRA fine-tuning end to end: train a base on Shakespeare's plays, fine-tune it with LoRA on his
poems, load it, export it merged, generate; the Python flows, exact resume and bad inputs.

The fine-tune corpus is a slice of the poems filtered to the characters of the base's char
vocabulary (a fine-tune keeps its base's tokenizer, which cannot grow; characters outside it
are a DataError, checked below).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from dantinox_eqx.config import Config, ConfigError
from dantinox_eqx.data.sampling import prepare_data, sample_batch
from dantinox_eqx.data.tokenizer import build_tokenizer, load_tokenizer
from dantinox_eqx.infer.generate import Generator
from dantinox_eqx.lora import adapter_params, apply_lora, has_lora, lora_summary, lora_trainable
from dantinox_eqx.model import Transformer
from dantinox_eqx.run import checkpoint as ckpt
from dantinox_eqx.run import finetune
from dantinox_eqx.run.pretrained import from_pretrained, saved_dtypes
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, loss_fn, make_eval_step, make_train_step
from dantinox_eqx.train.trainer import LOG_COLUMNS, Trainer, read_log

from .conftest import plays_text, poems_text
from .runs import StopRun, stop_at, write_run

EXE = Path(sys.executable).parent / "dantinox-eqx"
EXACT = [c for c in LOG_COLUMNS if c not in ("ms_per_step", "tokens_per_s")]
# A tiny char model (SwiGLU MLP 32 -> 2 x 64 -> 32): 200 steps reach val ~2.48 on Shakespeare.
BASE = dict(dim=32, n_heads=4, head_size=8, num_blocks=2, max_context=32, batch_size=16, expansion=2,
            lr=1e-2, warmup_steps=10, max_steps=200, eval_interval=100, eval_iters=8, tokenizer_type="char")


def cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([str(EXE), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


def _files(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _arrays(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in ckpt.flatten(eqx.filter(model, eqx.is_array)).items()}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    """(a slice of the plays, a slice of the poems filtered to the plays slice's characters)."""
    root = tmp_path_factory.mktemp("corpora")
    shk = plays_text()[:60_000]
    vocab = set(shk)
    poems = "".join(c for c in poems_text()[:62_000] if c in vocab)
    assert len(poems) > 55_000  # the filter drops little: it is still the poems
    (root / "shakespeare.txt").write_text(shk, encoding="utf-8")
    (root / "poems.txt").write_text(poems, encoding="utf-8")
    return root / "shakespeare.txt", root / "poems.txt"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpora) -> Path:
    """The base run, trained with the real executable (read-only for the tests)."""
    root = tmp_path_factory.mktemp("base")
    Config(**BASE).to_yaml(root / "base.yaml")
    res = cli("train", "--config", root / "base.yaml", "--data_path", corpora[0], "--run_dir", root / "run")
    assert res.returncode == 0, res.stderr
    return root / "run"


def _val_loss(model, windows) -> float:
    params, static = eqx.partition(model, eqx.is_array)
    return float(make_eval_step(static)(params, windows)["loss"])


@pytest.mark.slow
def test_cli_train_lora_export_generate(tmp_path: Path, corpora, base_run: Path):
    base = tmp_path / "base"  # a private copy: this test deletes it at the end
    shutil.copytree(base_run, base)
    before = _files(base)
    ft, exported = tmp_path / "ft", tmp_path / "exported"

    # The seed's flow: the base's config.yaml, the new text, LoRA switched on; no --init_from.
    res = cli("train", "--config", base / "config.yaml", "--data_path", corpora[1], "--run_dir", ft,
              "--use_lora", "True", "--lora_rank", "8", "--lora_targets", "all", "--max_steps", "80",
              "--eval_interval", "20", "--eval_iters", "20", "--lr", "3e-2", "--warmup_steps", "0")
    assert res.returncode == 0, res.stderr
    assert f"LoRA fine-tune of {base}" in res.stderr

    # The run directory: adapter-only checkpoints, the pointer, the base's tokenizer.
    assert _files(base) == before  # base run bitwise untouched
    config = Config.from_yaml(ft / "config.yaml")
    assert config.use_lora and config.init_from == str(base.resolve())
    pointer = json.loads((ft / finetune.BASE_FILE).read_text())
    assert pointer["base_run"] == str(base.resolve()) and pointer["checkpoint"] == "best"
    assert pointer["step"] == ckpt.latest_step(base, ckpt.BEST)
    assert (ft / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    for which in (ckpt.BEST, ckpt.LATEST):
        names = set(saved_dtypes(ft, which))
        assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names), names

    # Val loss on the new text drops: the logged rows, and a paired measurement of the base
    # and the fine-tune on the same 32 x 16 fixed validation windows.
    rows = read_log(ft / "training_log.csv")
    assert [r["step"] for r in rows] == [20, 40, 60, 80]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.03, rows  # measured 2.583 -> 2.449
    base_model, tuned = from_pretrained(base), from_pretrained(ft)
    data = prepare_data(corpora[1], tokenizer_type="char", max_context=32,
                        tokenizer=load_tokenizer(base / "tokenizer.json"), cache_dir=tmp_path)
    windows = sample_batch(jnp.asarray(data.val), jax.random.key(123), 16, 32, accum=32)
    loss_base, loss_tuned = _val_loss(base_model, windows), _val_loss(tuned, windows)
    print(f"\nval loss on the poems: base {loss_base:.4f} -> LoRA {loss_tuned:.4f}; rows "
          f"{[round(r['val_loss'], 4) for r in rows]}")
    assert loss_tuned < loss_base - 0.05, (loss_base, loss_tuned)

    # Only A and B moved: every base array of the loaded fine-tune is bitwise the base run's.
    assert has_lora(tuned)
    base_arrays, tuned_arrays = _arrays(base_model), _arrays(tuned)
    assert set(tuned_arrays) - set(base_arrays) == {f"blocks.{m}.lora_{x}" for m in
                                                     ("attn.qkv", "attn.o", "mlp.up", "mlp.down") for x in "ab"}
    for name, value in base_arrays.items():
        np.testing.assert_array_equal(tuned_arrays[name], value, err_msg=name)
    assert all(np.abs(v).max() > 1e-4 for k, v in tuned_arrays.items() if k.endswith("lora_b"))
    tokens = jnp.asarray(data.val[:64].astype(np.int32)).reshape(2, 32)
    merged = from_pretrained(ft, merge_lora=True)
    assert not has_lora(merged)
    diff = float(jnp.abs(merged(tokens)[0] - tuned(tokens)[0]).max())
    assert diff < 1e-5, diff

    # model_summary.json: the trainable share and the adapter-only optimizer state (AdamW:
    # two float32 moments per adapter parameter, plus a few scalar counters).
    summary = json.loads((ft / "model_summary.json").read_text())
    expected = lora_summary(tuned)
    D, F, qkv = 32, 64, (4 + 2 * 4) * 8
    assert expected["trainable"] == 2 * 8 * ((D + qkv) + (D + D) + (D + 2 * F) + (F + D)) == 7168
    assert summary["trainable_params"] == expected["trainable"]
    assert summary["n_params"] == expected["total"]
    assert summary["trainable_percent"] == pytest.approx(expected["percent"], abs=1e-4)
    assert summary["optimizer_mem_MB"] == pytest.approx(2 * 7168 * 4 / 2**20, abs=1e-3)  # 0.055 MB
    # Proportional to the adapter: full fine-tuning's state would be 2 x weights_mem_MB.
    share = summary["trainable_params"] / summary["n_params"]
    assert summary["optimizer_mem_MB"] == pytest.approx(2 * summary["weights_mem_MB"] * share, abs=2e-3)
    print(f"summary: {summary['trainable_params']} of {summary['n_params']} trainable "
          f"({summary['trainable_percent']:.2f} %), optimizer {summary['optimizer_mem_MB']} MB, "
          f"weights {summary['weights_mem_MB']} MB")

    # Generate greedily from the adapter run, export it merged, generate from the export.
    gen = ("generate", "--prompt", "The ", "--max_new_tokens", "60", "--temperature", "0")
    from_adapter = cli(*gen[:1], ft, *gen[1:])
    assert from_adapter.returncode == 0, from_adapter.stderr
    sampled = Generator(ft).generate("The ", max_new_tokens=80, temperature=1.0, seed=3)
    refused = cli("export", ft, tmp_path / "unmerged")
    assert refused.returncode == 2 and "--merge-lora" in refused.stderr and not (tmp_path / "unmerged").exists()
    res = cli("export", ft, exported, "--merge-lora")
    assert res.returncode == 0, res.stderr
    assert (exported / "model.safetensors").is_file()
    assert sorted(p.name for p in exported.iterdir()) == ["checkpoints", "config.yaml", "model.safetensors",
                                                          "tokenizer.json"]
    saved = yaml.safe_load((exported / "config.yaml").read_text())
    assert saved["use_lora"] is False and saved["init_from"] == ""

    # The export needs the base no more: delete the base run, then load and generate.
    shutil.rmtree(base)
    assert str(base) not in (exported / "config.yaml").read_text()
    reloaded = from_pretrained(exported)
    np.testing.assert_array_equal(reloaded(tokens)[0], merged(tokens)[0])
    from_export = cli(*gen[:1], exported, *gen[1:])
    assert from_export.returncode == 0, from_export.stderr
    assert from_export.stdout == from_adapter.stdout
    assert len(from_adapter.stdout) > 60 and from_adapter.stdout.startswith("The ")
    print(f"greedy text (adapter run == export): {from_adapter.stdout!r}; sampled: {sampled!r}")
    assert Generator(exported).generate("The ", max_new_tokens=80, temperature=1.0, seed=3) == sampled
    # ... while the adapter run, whose base is gone, is refused clearly (CLI: exit code 2).
    with pytest.raises(FileNotFoundError, match="is a LoRA fine-tune of .* which no longer exists"):
        from_pretrained(ft)


@pytest.mark.slow
def test_cli_bad_inputs_exit_2_naming_the_field(tmp_path: Path, corpora, base_run: Path):
    before = _files(base_run)
    bad_text = tmp_path / "greek.txt"
    bad_text.write_text("Ἀρχὴ " * 2000, encoding="utf-8")
    cases = [
        # A target that matches nothing in the library is a ConfigError too (test_lora.py); MoE
        # experts now take per-expert adapters, so "mlp" matches on every model.
        (("--config", base_run / "config.yaml", "--use_lora", "True", "--lora_targets", "ffn"),
         "lora_targets: unknown value 'ffn'"),
        (("--config", base_run / "config.yaml", "--use_lora", "True", "--lora_rank", "0"),
         "lora_rank: must be positive, got 0"),
        (("--config", base_run / "config.yaml", "--use_lora", "True", "--lora_rank", "33"),
         "lora_rank: 33 exceeds min(d_in, d_out) = 32"),
        (("--config", base_run / "config.yaml", "--init_from", base_run, "--use_lora", "True", "--dim", "64",
          "--head_size", "16"), "has dim=32, this config has dim=64"),
        (("--config", base_run / "config.yaml", "--use_lora", "True", "--data_path", bad_text),
         "outside the char vocabulary"),
    ]
    for i, (args, message) in enumerate(cases):
        if "--data_path" not in args:
            args = (*args, "--data_path", corpora[1])
        res = cli("train", *args, "--run_dir", tmp_path / f"out{i}", "--max_steps", "2")
        assert res.returncode == 2, (args, res.stderr)
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: ") and message in last and "Traceback" not in res.stderr, last
        assert not (tmp_path / f"out{i}").exists()
    assert _files(base_run) == before


def test_unknown_target_and_missing_base_are_config_errors(tmp_path: Path, corpora):
    with pytest.raises(ConfigError, match="^lora_targets"):
        Config(**BASE, use_lora=True, lora_targets="ffn")
    with pytest.raises(ConfigError, match="^use_lora: a LoRA fine-tune keeps its base"):
        Trainer(Config(**BASE, use_lora=True)).fit(corpora[1], run_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="^init_from: .* is not a run directory"):
        Trainer(Config(**BASE, init_from=str(tmp_path / "nowhere"))).fit(corpora[1], run_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_lora_dropout_acts_in_the_train_step_and_a_given_adapted_model_needs_use_lora(tmp_path, corpora):
    cfg = Config(**{**BASE, "num_blocks": 1, "max_context": 16}, vocab_size=40)
    base = Transformer(cfg, key=jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (1, 4, 17), 0, 40)

    # dropout_rate is 0: the step's key can only act through LoRA dropout.
    model = apply_lora(base, "all", rank=4, dropout=0.5, key=jax.random.key(2))
    model = eqx.tree_at(lambda m: m.blocks.attn.qkv.lora_b, model,
                        0.5 * jnp.ones_like(model.blocks.attn.qkv.lora_b))  # B != 0: the path matters
    params, static = eqx.partition(model, eqx.is_array)
    trainable = lora_trainable(model)
    opt = make_optimizer(cfg, 10)
    step = make_train_step(static, opt, trainable=trainable, donate=False)
    state = init_opt_state(opt, params, trainable)
    a, b = (float(step(params, state, batch, jax.random.key(k))[2]["loss"]) for k in (3, 4))
    plain = float(eqx.filter_jit(loss_fn)(model, batch[0])[0])  # no key: no dropout
    assert abs(a - b) > 1e-4 and abs(a - plain) > 1e-4, (a, b, plain)

    tok = build_tokenizer("char", corpora[1].read_text(encoding="utf-8"))
    adapted = apply_lora(Transformer(cfg.replace(vocab_size=tok.get_vocab_size()), key=jax.random.key(0)),
                         key=jax.random.key(1))
    with pytest.raises(ConfigError, match="^use_lora: the given model has LoRA adapters"):
        Trainer(Config(**BASE), model=adapted).fit(corpora[1], run_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_rule_config_of_a_run_dir_is_the_base(tmp_path: Path):
    """`--config RUN/config.yaml --use_lora True` without --init_from fine-tunes RUN; nothing
    else turns init_from on by itself."""
    from cli.train import build_config

    from dantinox_eqx.train.trainer import default_config_path

    cfg = Config(**BASE, vocab_size=40)
    run = write_run(tmp_path / "run", cfg, build_tokenizer("char", "abcdefghijklmnopqrstuvwxyz0123456789 .,\n"),
                    eqx.filter(Transformer(cfg, key=jax.random.key(0)), eqx.is_array), 3)
    config_path = str(run / "config.yaml")
    assert build_config(config_path, None, False, {"use_lora": "True"}).init_from == str(run.resolve())
    assert build_config(config_path, None, False, {"use_lora": None}).init_from == ""
    assert build_config(config_path, None, False, {"use_lora": "True", "init_from": "elsewhere"}
                        ).init_from == "elsewhere"
    shutil.copy(run / "config.yaml", tmp_path / "config.yaml")  # not a run directory: no checkpoints
    assert build_config(str(tmp_path / "config.yaml"), None, False, {"use_lora": "True"}).init_from == ""

    # --init_from RUN without --config starts from RUN's config (its shape: dim 32 here, the
    # packaged default's 128 would be refused); --config still wins; a path that is no run
    # directory falls back to the default (and the trainer then refuses it, naming init_from).
    given = build_config(None, None, False, {"init_from": str(run), "use_lora": "True", "lr": "0.002"})
    assert (given.dim, given.vocab_size, given.init_from, given.use_lora, given.lr) == (32, 40, str(run), True, 0.002)
    assert build_config(config_path, None, False, {"init_from": str(run), "dim": None}).dim == 32
    default_dim = Config.from_yaml(default_config_path()).dim
    assert build_config(None, None, False, {"init_from": str(tmp_path / "nowhere")}).dim == default_dim != 32


def _same_runs(a: Path, b: Path, like) -> None:
    """Identical log rows (all but timing) and bitwise identical checkpoints."""
    assert [{k: r[k] for k in EXACT} for r in read_log(a / "training_log.csv")] == \
           [{k: r[k] for k in EXACT} for r in read_log(b / "training_log.csv")]
    for which in (ckpt.BEST, ckpt.LATEST):
        (sa, pa, _), (sb, pb, _) = ckpt.restore(a, which, like), ckpt.restore(b, which, like)
        assert sa == sb
        for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_python_flows_resume_and_changed_base(tmp_path: Path, corpora, base_run: Path):
    text = corpora[1]
    ft_config = Config.from_yaml(base_run / "config.yaml").replace(
        use_lora=True, lora_rank=4, lora_targets="attention", init_from=str(base_run), max_steps=30,
        eval_interval=10, lr=2e-2, warmup_steps=0, dropout_rate=0.0, lora_dropout=0.1)

    # From init_from alone, and with the base model passed in (the seed's Python flow).
    a = Trainer(ft_config, progress=False).fit(text, run_dir=tmp_path / "a")
    b = Trainer(ft_config, model=Transformer.from_pretrained(base_run), progress=False).fit(
        text, run_dir=tmp_path / "b")
    adapter_like = adapter_params(from_pretrained(a))
    _same_runs(a, b, adapter_like)
    assert (a / finetune.BASE_FILE).read_text() == (b / finetune.BASE_FILE).read_text()

    # Exact resume (LoRA dropout on: its keys must resume too): stopped after step 10's
    # checkpoint, continued, the same rows and checkpoints as never stopping.
    with pytest.raises(StopRun):
        Trainer(ft_config, loggers=[stop_at(10)], progress=False).fit(text, run_dir=tmp_path / "c")
    assert ckpt.latest_step(tmp_path / "c", ckpt.LATEST) == 10
    Trainer(ft_config, progress=False).fit(text, run_dir=tmp_path / "c", resume=True)
    _same_runs(a, tmp_path / "c", adapter_like)

    # A resume on another base, or with other adapters, is refused before anything is written.
    c = tmp_path / "c"
    files = _files(c)
    pointer = json.loads((c / finetune.BASE_FILE).read_text())
    (c / finetune.BASE_FILE).write_text(json.dumps({**pointer, "params_sha256": "0" * 64}))
    with pytest.raises(ckpt.CheckpointError, match="^init_from: the base run .* is not the one"):
        Trainer(ft_config.replace(max_steps=40), progress=False).fit(text, run_dir=c, resume=True)
    with pytest.raises(ckpt.CheckpointError, match="changed since the fine-tune"):
        from_pretrained(c)
    (c / finetune.BASE_FILE).write_text(json.dumps(pointer, indent=2) + "\n")
    with pytest.raises(ConfigError, match="^lora_rank: the run in"):
        Trainer(ft_config.replace(lora_rank=2, max_steps=40), progress=False).fit(text, run_dir=c, resume=True)
    assert _files(c) == files

    # A given model that is not the init_from run's weights cannot be pointed to.
    other = eqx.tree_at(lambda m: m.norm.scale, Transformer.from_pretrained(base_run),
                        replace_fn=lambda s: s * 2)
    with pytest.raises(ConfigError, match="^init_from: the given model's weights are neither"):
        Trainer(ft_config, model=other).fit(text, run_dir=tmp_path / "d")
    # Without init_from the tokenizer must be named, and then the run saves the whole adapted
    # model (no base to point to): its frozen arrays, saved after training, are bitwise the
    # base's, and it trained exactly as the pointer runs did.
    given = ft_config.replace(init_from="")
    with pytest.raises(ConfigError, match="^use_lora: a LoRA fine-tune keeps its base"):
        Trainer(given, model=Transformer.from_pretrained(base_run)).fit(text, run_dir=tmp_path / "d")
    assert not (tmp_path / "d").exists()
    given = given.replace(tokenizer_path=str(base_run / "tokenizer.json"))
    d = Trainer(given, model=Transformer.from_pretrained(base_run), progress=False).fit(text, run_dir=tmp_path / "d")
    assert not (d / finetune.BASE_FILE).exists()
    assert any(not n.endswith(("lora_a", "lora_b")) for n in saved_dtypes(d, ckpt.BEST))
    whole = from_pretrained(d)
    base_arrays, whole_arrays = _arrays(from_pretrained(base_run)), _arrays(whole)
    for name, value in base_arrays.items():
        np.testing.assert_array_equal(whole_arrays[name], value, err_msg=name)
    rows_a, rows_d = read_log(a / "training_log.csv"), read_log(d / "training_log.csv")
    assert [{k: r[k] for k in EXACT} for r in rows_a] == [{k: r[k] for k in EXACT} for r in rows_d]
    for name, value in _arrays(adapter_params(from_pretrained(a))).items():
        np.testing.assert_array_equal(whole_arrays[name], value, err_msg=name)
    summary = json.loads((d / "model_summary.json").read_text())
    assert summary["trainable_params"] == 2 * 4 * ((32 + 96) + (32 + 32))
    assert summary["lora_base_run"] is None
    assert math.isfinite(rows_d[-1]["val_loss"])
