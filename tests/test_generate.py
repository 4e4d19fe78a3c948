"""Sampling: pure sampling functions, cached decoding vs the full forward, batching, seeds,
streaming, stop strings, long contexts; loading run directories; evaluation."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dantinox_eqx.config import Config, ConfigError
from dantinox_eqx.data.tokenizer import TokenizerError, bpe_tokenizer, char_tokenizer
from dantinox_eqx.infer.evaluate import covering_windows, evaluate, evaluate_ids
from dantinox_eqx.infer.generate import (
    Generator,
    Sampling,
    bucket,
    cache_size,
    decode_steps,
    generate_ids,
    left_pad,
    naive_generate,
    prefill,
    sample_logits,
    top_k_filter,
    top_p_filter,
)
from dantinox_eqx.infer.storage import store_weights
from dantinox_eqx.model import Transformer, cast_floating
from dantinox_eqx.run.checkpoint import CheckpointError
from dantinox_eqx.run.pretrained import from_pretrained, load_config
from dantinox_eqx.train.step import make_eval_step

from .conftest import TINY, plays_text
from .procs import xla_flags
from .runs import make_run, write_run

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n")
TOK = char_tokenizer(TEXT)


def _model(**kw) -> Transformer:
    cfg = Config(**{**TINY, "vocab_size": TOK.get_vocab_size(), "max_context": 32, **kw})
    return Transformer(cfg, key=jax.random.key(0))


def _prompt(n: int, seed: int = 3) -> list[int]:
    return np.asarray(jax.random.randint(jax.random.key(seed), (n,), 0, TOK.get_vocab_size())).tolist()


# --------------------------------------------------------------------------- sampling functions
def test_top_k_filter_keeps_the_k_largest():
    logits = jnp.array([[1.0, 3.0, 2.0, 0.0], [5.0, -1.0, 4.0, 4.5]])
    out = np.asarray(top_k_filter(logits, 2))
    np.testing.assert_array_equal(out, [[-np.inf, 3.0, 2.0, -np.inf], [5.0, -np.inf, -np.inf, 4.5]])
    np.testing.assert_array_equal(top_k_filter(logits, 0), logits)  # 0 = off
    np.testing.assert_array_equal(top_k_filter(logits, 10), logits)  # k > V keeps all


def test_top_p_filter_keeps_the_smallest_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs))[None]
    kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, p)))[0].tolist()
    assert kept(0.5) == [True, False, False, False]  # 0.5 reached by the first token
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1e-6) == [True, False, False, False]  # the top token always stays
    assert kept(1.0) == [True, True, True, True]


_sample = jax.jit(sample_logits)  # all settings are traced: one compilation per logits shape


def test_temperature_zero_top_k_one_and_tiny_top_p_are_greedy():
    logits = jax.random.normal(jax.random.key(0), (64, 37)) * 3
    greedy = np.asarray(jnp.argmax(logits, -1))
    for i in range(5):
        key = jax.random.key(i)
        np.testing.assert_array_equal(_sample(logits, key, 0.0), greedy)
        np.testing.assert_array_equal(_sample(logits, key, 1.0, 1), greedy)
        np.testing.assert_array_equal(_sample(logits, key, 1.0, 0, 1e-6), greedy)
    assert (np.asarray(_sample(logits, jax.random.key(0), 1.0)) != greedy).any()  # it does sample


def test_samples_follow_the_softmax_and_the_filters():
    n = 20_000
    logits = jnp.broadcast_to(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), (n, 4))
    freq = lambda s: np.bincount(np.asarray(s), minlength=4) / n
    key = jax.random.key(7)
    np.testing.assert_allclose(freq(_sample(logits, key, 1.0)), [0.5, 0.3, 0.15, 0.05], atol=0.015)
    np.testing.assert_allclose(freq(_sample(logits, key, 1.0, 2)), [0.625, 0.375, 0, 0], atol=0.015)
    np.testing.assert_allclose(freq(_sample(logits, key, 1.0, 0, 0.81)),
                               np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.015)
    # temperature 2 flattens: p ~ sqrt(p)
    flat = np.sqrt([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(freq(_sample(logits, key, 2.0)), flat / flat.sum(), atol=0.015)


def test_buckets_are_powers_of_two_within_the_context():
    assert [bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    assert bucket(100, cap=64) == 100 and bucket(40, cap=64) == 64 and bucket(3, cap=8) == 8


# --------------------------------------------------------------------------- cached decoding
@pytest.mark.parametrize("kw", [{}, {"kv_heads": 2, "weight_tying": False},
                                {"sliding_window": True, "context_window": 5}])
def test_cached_generation_matches_the_full_forward(kw):
    model = _model(**kw)
    prompt = _prompt(7)
    for temperature in (0.0, 1.0):
        ids, logits = generate_ids(model, [prompt], 20, temperature=temperature, seed=1, return_logits=True)
        seq = jnp.asarray([prompt + ids[0].tolist()])  # 27 <= max_context = 32
        full, _ = model(seq)
        # the token at index 7 + i was sampled from the logits of position 6 + i
        diff = np.abs(logits[0] - np.asarray(full[0, 6:26])).max()
        assert diff < 1e-4, diff
        if temperature == 0.0:
            assert ids[0].tolist() == naive_generate(model, prompt, 20)


def test_no_recompilation_per_token_prompt_length_or_setting(caplog):
    model = _model()
    generate_ids(model, [_prompt(5)], 12, temperature=1.0)  # compile: prompt bucket 16, capacity 16
    p11, p2 = _prompt(11), _prompt(2)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        generate_ids(model, [p11], 9, temperature=0.3, top_k=5, top_p=0.9, seed=3)
        generate_ids(model, [p2], 16, temperature=0.0, seed=4)
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled == []


@pytest.mark.slow
def test_a_batch_of_prompts_equals_each_prompt_alone():
    model = _model(kv_heads=2)
    prompts = [_prompt(3, 1), _prompt(14, 2), _prompt(9, 3)]
    batch, blog = generate_ids(model, prompts, 12, temperature=0.0, return_logits=True)
    for r, p in enumerate(prompts):
        alone, alog = generate_ids(model, [p], 12, temperature=0.0, return_logits=True)
        assert batch[r].tolist() == alone[0].tolist()
        assert np.abs(blog[r] - alog[0]).max() < 1e-4
    # sampled: row 0's key is the same alone and in a batch
    s_batch, _ = generate_ids(model, prompts, 12, temperature=1.0, seed=4, return_logits=True)
    s_alone, _ = generate_ids(model, prompts[:1], 12, temperature=1.0, seed=4, return_logits=True)
    assert s_batch[0].tolist() == s_alone[0].tolist()


@pytest.mark.slow
def test_seeds_streaming_and_batches_of_text():
    gen = Generator.from_model(_model(), TOK)
    a = gen.generate("First", max_new_tokens=40, stop_at_eot=False, seed=0)
    # one char per ordinary token; <|endoftext|> and [UNK] (ids n, n + 1) decode to nothing
    # (generation goes on past <|endoftext|> here: the next test has it end there)
    n = len(set(TEXT))
    ids, _ = generate_ids(gen.model, [TOK.encode(p).ids for p in ("First", "All:\nSpeak")], 40, seed=0)
    assert len(a) == (ids[0] < n).sum() > 30 and set(a) <= set(TEXT)
    assert gen.generate("First", max_new_tokens=40, stop_at_eot=False, seed=0) == a
    assert gen.generate("First", max_new_tokens=40, stop_at_eot=False, seed=1) != a
    pieces = list(gen.stream("First", max_new_tokens=40, stop_at_eot=False, seed=0))
    assert len(pieces) == 3 and "".join(pieces) == a  # 16 + 16 + 8 tokens
    both = gen.generate(["First", "All:\nSpeak"], max_new_tokens=40, stop_at_eot=False, seed=0)
    assert both[0] == a and len(both[1]) == (ids[1] < n).sum()
    rows = list(gen.stream(["First", "All:\nSpeak"], max_new_tokens=40, stop_at_eot=False, seed=0))
    assert ["".join(r[i] for r in rows) for i in range(2)] == both
    assert gen.generate("First", max_new_tokens=0) == ""


def test_stop_strings_end_and_trim_the_text():
    gen = Generator.from_model(_model(), TOK)
    full = gen.generate("First", max_new_tokens=60, stop_at_eot=False, seed=2)
    stop = full[20:23]
    cut = full[:full.index(stop)]
    assert gen.generate("First", max_new_tokens=60, stop_at_eot=False, seed=2, stop=stop) == cut
    assert "".join(gen.stream("First", max_new_tokens=60, stop_at_eot=False, seed=2, stop=[stop, "\x00"])) == cut
    assert gen.generate("First", max_new_tokens=60, stop_at_eot=False, seed=2, stop="\x00") == full  # never occurs
    other = gen.generate(["First", "All:"], max_new_tokens=60, stop_at_eot=False, seed=2)[1]
    batch = gen.generate(["First", "All:"], max_new_tokens=60, stop_at_eot=False, seed=2, stop=stop)
    assert batch[0] == cut and batch[1] == (other[:other.index(stop)] if stop in other else other)


def test_generation_ends_at_the_end_of_text_token():
    gen = Generator.from_model(_model(), TOK)
    eot = TOK.token_to_id("<|endoftext|>")
    prompt = TOK.encode("First").ids
    # seeds whose 40 sampled tokens hold an end-of-text token after some text (an untrained
    # model samples it about once in 30 tokens), found by the token-level sampler
    found = {}
    for seed in range(40):
        ids = generate_ids(gen.model, [prompt], 40, seed=seed)[0][0].tolist()
        if eot in ids[2:]:
            found[seed] = ids
    assert len(found) >= 3
    for seed, ids in list(found.items())[:3]:
        before = TOK.decode(ids[:ids.index(eot)])
        assert before and gen.generate("First", max_new_tokens=40, seed=seed) == before
        assert "".join(gen.stream("First", max_new_tokens=40, seed=seed, chunk=3)) == before
        assert gen.generate(["First", "All:"], max_new_tokens=40, seed=seed)[0] == before  # per row
        whole = gen.generate("First", max_new_tokens=40, seed=seed, stop_at_eot=False)
        assert whole == TOK.decode(ids) and len(whole) > len(before)
    # a stop string before the end-of-text token still cuts first
    seed, ids = next(iter(found.items()))
    before = TOK.decode(ids[:ids.index(eot)])
    assert gen.generate("First", max_new_tokens=40, seed=seed, stop=before[-1]) == before[:before.index(before[-1])]


@pytest.mark.slow
def test_streaming_byte_level_bpe_never_splits_a_character():
    text = "café naïve — 東京 🙂 " * 40 + TEXT
    tok = bpe_tokenizer(text, 300)
    model = Transformer(Config(**{**TINY, "vocab_size": tok.get_vocab_size(), "max_context": 32}),
                        key=jax.random.key(0))
    gen = Generator.from_model(model, tok)
    for seed in range(3):
        whole = gen.generate("caf", max_new_tokens=48, seed=seed)
        pieces = list(gen.stream("caf", max_new_tokens=48, seed=seed, chunk=1))
        assert "".join(pieces) == whole
        # a piece ends in a replacement character only where the final text has one
        assert sum(p.count("\ufffd") for p in pieces) == whole.count("\ufffd")


def test_a_prompt_longer_than_the_context_is_cut_with_a_warning():
    model = _model()
    long = _prompt(50)
    with pytest.warns(UserWarning, match="max_context=32"):
        ids, _ = generate_ids(model, [long], 8, temperature=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tail, _ = generate_ids(model, [long[-32:]], 8, temperature=0.0)
    assert ids.tolist() == tail.tolist()
    with pytest.raises(ConfigError, match="prompt"):
        generate_ids(model, [[]], 4)
    with pytest.raises(ConfigError, match="list of prompts"):
        generate_ids(model, [], 4)
    with pytest.raises(ConfigError, match="top_p"):
        generate_ids(model, [long], 4, top_p=1.5)


# --------------------------------------------------------------------------- long contexts
@pytest.mark.parametrize("kw", [{}, {"rope_scale_factor": 4.0}, {"sliding_window": True, "context_window": 4},
                                {"rope_scale_factor": 4.0, "sliding_window": True, "context_window": 4}])
def test_sampling_past_max_context(kw):
    model = _model(max_context=16, **kw)
    ids, logits = generate_ids(model, [_prompt(10)], 40, temperature=1.0, return_logits=True)
    assert ids.shape == (1, 40) and logits.shape == (1, 40, TOK.get_vocab_size())
    assert np.isfinite(logits).all() and (ids >= 0).all() and (ids < TOK.get_vocab_size()).all()
    # the last tokens attend to a full window: their logits are not the empty-context ones
    assert np.abs(logits[0, -1] - logits[0, -2]).max() > 1e-6


@pytest.mark.slow
def test_sliding_window_cache_is_exact_beyond_max_context():
    """With a window smaller than the cache (no sink), the ring buffer holds every key a query
    may read, so cached decoding equals the full windowed forward even past max_context."""
    model = _model(max_context=16, sliding_window=True, context_window=4, no_sink=True)
    prompt = _prompt(6)
    ids, logits = generate_ids(model, [prompt], 42, temperature=1.0, seed=5, return_logits=True)
    full, _ = model(jnp.asarray([prompt + ids[0].tolist()]))  # 48 tokens: RoPE has no length limit
    assert np.abs(logits[0] - np.asarray(full[0, 5:47])).max() < 1e-4


# --------------------------------------------------------------------------- run directories
def _random_run(tmp_path: Path, dtype=jnp.float32, **kw) -> tuple[Path, Transformer]:
    cfg = Config(**{**TINY, "vocab_size": TOK.get_vocab_size(), "use_bf16": dtype == jnp.bfloat16, **kw})
    model = cast_floating(Transformer(cfg, key=jax.random.key(1)), dtype)
    write_run(tmp_path / "run", cfg, TOK, eqx.filter(model, eqx.is_array), 7)
    return tmp_path / "run", model


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.slow
def test_a_run_round_trips_in_its_saved_dtype(tmp_path, dtype):
    run, model = _random_run(tmp_path, dtype)
    for best in (True, False):
        loaded = Transformer.from_pretrained(run, best=best)
        saved, got = eqx.filter(model, eqx.is_array), eqx.filter(loaded, eqx.is_array)
        assert jax.tree.structure(saved) == jax.tree.structure(got)
        for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(got)):
            assert b.dtype == a.dtype == dtype
            np.testing.assert_array_equal(np.asarray(a).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32),
                                          np.asarray(b).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32))
    as32 = from_pretrained(run, dtype=jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(eqx.filter(as32, eqx.is_array)))
    gen = Generator(run)  # a bfloat16 run samples with bfloat16 weights
    assert gen.model.embedding.dtype == dtype and len(gen.generate("All", max_new_tokens=5)) == 5


def test_broken_run_directories_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        from_pretrained(empty)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.yaml").write_text("dim: [1, 2\n  : {")
    with pytest.raises(ConfigError, match="garbage"):
        from_pretrained(garbage)
    no_ckpt = tmp_path / "no_ckpt"
    Config(**TINY).to_yaml(no_ckpt / "config.yaml")
    with pytest.raises(CheckpointError, match="no 'best' checkpoint"):
        from_pretrained(no_ckpt)
    no_vocab = tmp_path / "no_vocab"
    Config(**{**TINY, "vocab_size": None}).to_yaml(no_vocab / "config.yaml")
    with pytest.raises(ConfigError, match="vocab_size"):
        load_config(no_vocab)
    run, _ = _random_run(tmp_path)
    Config(**{**TINY, "vocab_size": TOK.get_vocab_size(), "dim": 64, "head_size": 16}).to_yaml(run / "config.yaml")
    with pytest.raises(CheckpointError, match="does not fit|shape"):
        from_pretrained(run)
    Config(**{**TINY, "vocab_size": TOK.get_vocab_size()}).to_yaml(run / "config.yaml")
    (run / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Generator(run)


@pytest.mark.slow
def test_mla_runs_load_in_inference_mode(tmp_path):
    run, model = _random_run(tmp_path, mla=True, down_dim_q=16, down_dim_kv=16, rope_dim=4)
    trained = from_pretrained(run)
    sampler = Generator(run).model
    leaves = lambda m: jax.tree.leaves(eqx.filter(m, eqx.is_array))
    for a, b in zip(leaves(store_weights(trained, "float32")), leaves(sampler)):  # the decode layout
        np.testing.assert_array_equal(a, b)
    toks = jnp.asarray([_prompt(9)])
    full, _ = trained(toks)
    cached, _ = sampler.decode(toks, jnp.arange(9)[None], sampler.init_cache(1))
    assert np.abs(np.asarray(full) - np.asarray(cached)).max() < 1e-4


@pytest.mark.slow
def test_a_run_saved_on_two_devices_loads_on_one(tmp_path):
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = {xla_flags(2)!r}
        os.environ["JAX_PLATFORMS"] = "cpu"
        import equinox as eqx, jax
        from pathlib import Path
        from jax.sharding import NamedSharding, PartitionSpec as P
        from dantinox_eqx.config import Config
        from dantinox_eqx.model import Transformer
        from dantinox_eqx.parallel.sharding import make_mesh
        from dantinox_eqx.data.tokenizer import char_tokenizer
        from tests.runs import write_run
        assert len(jax.devices()) == 2
        mesh = make_mesh(2)
        cfg = Config(**{{**{TINY!r}, "vocab_size": 38}})
        params = eqx.filter(Transformer(cfg, key=jax.random.key(1)), eqx.is_array)
        # shard the embedding over both devices, replicate the rest
        params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), params)
        params = eqx.tree_at(lambda p: p.embedding, params,
                             jax.device_put(params.embedding, NamedSharding(mesh, P("data"))))
        write_run(Path({str(tmp_path / "run")!r}), cfg, char_tokenizer({TEXT!r}), params, 3)
    """)
    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": f"{root / 'src'}:{root}"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=root)
    loaded = from_pretrained(tmp_path / "run")
    ref = Transformer(Config(**{**TINY, "vocab_size": 38}), key=jax.random.key(1))
    assert len(loaded.embedding.devices()) == 1
    leaves = lambda m: jax.tree.leaves(eqx.filter(m, eqx.is_array))
    for a, b in zip(leaves(ref), leaves(loaded)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- evaluation
def test_covering_windows_score_every_token_once():
    for n, t in [(33, 8), (40, 8), (9, 8), (100, 7)]:
        starts, mask = covering_windows(n, t)
        scored = np.concatenate([s + 1 + np.nonzero(m)[0] for s, m in zip(starts, mask)])
        assert sorted(scored.tolist()) == list(range(1, n))
        assert (starts + t + 1 <= n).all()


@pytest.mark.slow
def test_evaluation_equals_the_training_loss_on_the_same_windows():
    model = _model(max_context=16)
    ids = np.asarray(jax.random.randint(jax.random.key(9), (16 * 6 + 1,), 0, TOK.get_vocab_size()))
    nats, n, windows, seq = evaluate_ids(model, ids, batch_size=4)  # 6 windows: one padded batch
    assert (n, windows, seq) == (96, 6, 16)
    batches = jnp.asarray(ids[np.arange(6)[:, None] * 16 + np.arange(17)])[None]
    params, static = eqx.partition(model, eqx.is_array)
    np.testing.assert_allclose(nats / n, make_eval_step(static)(params, batches)["loss"], rtol=1e-5)
    # random windows: fixed by the seed
    a, b = evaluate_ids(model, ids, n_batches=3, seed=1), evaluate_ids(model, ids, n_batches=3, seed=1)
    assert a == b and a[1] == 3 * 8 * 16 and evaluate_ids(model, ids, n_batches=3, seed=2)[0] != a[0]


def test_evaluate_reports_consistent_units():
    model = _model()
    r = evaluate(model, TOK, TEXT, batch_size=2)
    assert r.mode == "all" and r.n_tokens == len(TEXT) - 1 and r.n_chars == len(TEXT) - 1
    assert math.isclose(r.perplexity, math.exp(r.loss), rel_tol=1e-9)
    assert math.isclose(r.bits_per_token, r.loss / math.log(2), rel_tol=1e-9)
    assert math.isclose(r.bits_per_char, r.bits_per_token, rel_tol=1e-9)  # char tokenizer
    assert abs(r.loss - math.log(TOK.get_vocab_size())) < 0.2  # a random model is near uniform
    with pytest.raises(TokenizerError):
        evaluate(model, TOK, "QQQ \u2603")


@pytest.mark.slow
def test_a_trained_run_samples_and_beats_a_random_model(tmp_path):
    corpus = tmp_path / "corpus.txt"
    text = plays_text()
    corpus.write_text(text[:20_000], encoding="utf-8")
    run = make_run(tmp_path / "run", corpus)
    gen = Generator(run)
    out = gen.generate("ROMEO:", max_new_tokens=64, temperature=0.8, seed=0)
    assert len(out) == 64 and set(out) <= set(text[:20_000])
    vocab = set(gen.tokenizer.get_vocab())
    held_out = "".join(c for c in text[30_000:32_000] if c in vocab)
    trained = evaluate(gen.model, gen.tokenizer, held_out)
    random = evaluate(Transformer(load_config(run), key=jax.random.key(5)), gen.tokenizer, held_out)
    assert trained.loss < random.loss - 0.5, (trained.loss, random.loss)


@pytest.mark.slow
def test_the_cache_is_sized_to_the_generation():
    """A short generation gets a short cache (prompt + new tokens, a power of two, at most
    max_context), with the tokens and logits of a max_context cache: no slot is overwritten
    in either, the extra slots are masked (their softmax weight is exactly 0)."""
    model = _model(max_context=64)
    assert [cache_size(model, p, n) for p, n in ((7, 5), (7, 9), (30, 30), (60, 60))] == [16, 16, 64, 64]
    prompt = _prompt(7)
    tokens, positions = left_pad([prompt], 16)
    sampling = Sampling.make(0.0, None, None, model.vocab_size)
    runs = []
    for size in (16, None):
        state = prefill(model, jnp.asarray(tokens), jnp.asarray(positions), size)
        assert jax.tree.leaves(state.cache)[0].shape[2] == (size or 64)  # (blocks, B, S, K, E)
        _, out, seen = decode_steps(model, state, jnp.int32(9), jax.random.key(0), sampling, 16, True)
        runs.append((np.asarray(out)[0, :9], np.asarray(seen)[0, :9]))
    greedy = generate_ids(model, [prompt], 9, temperature=0.0)[0][0]  # through _chunks: a 16-slot cache
    assert runs[0][0].tolist() == runs[1][0].tolist() == greedy.tolist()
    assert np.abs(runs[0][1] - runs[1][1]).max() <= 1e-5 * np.abs(runs[1][1]).max()  # sum order only
