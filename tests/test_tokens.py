"""tokens.py: prepared datasets (memory-mapped shards), splits, bytes, host-side batches."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dantinox_eqx.config import Config
from dantinox_eqx.data import DataError, feeds, tokens
from dantinox_eqx.data import tokenizer as tk

from .prepared import EOT, char_tokenizer_with_eot, split_docs, write_ids, write_prepared

WORDS = ["the", "king", "café", "naïve", "— said", "queen", "of", "a", "sword", "ünïcødé", "and", "night"]


def synthetic_text(n_words: int = 6000, seed: int = 0) -> str:
    """Seeded word salad with multi-byte characters, in lines (so bytes != characters)."""
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, size=n_words)
    return "".join(w + ("\n" if i % 9 == 8 else " ") for i, w in enumerate(words))


@pytest.fixture
def text() -> str:
    return synthetic_text()


@pytest.fixture
def prepared(tmp_path: Path, text: str) -> Path:
    tok = char_tokenizer_with_eot(text)
    return write_prepared(tmp_path / "ds", split_docs(text, 12), tok, shard_tokens=4000)


def _concat(path: Path) -> np.ndarray:
    index = tokens.read_index(path)
    return np.concatenate([np.fromfile(path / s["file"], np.uint16) for s in index["shards"]])


def test_stream_reads_windows_across_shard_boundaries(prepared: Path, text: str):
    stream, tok = tokens.open_prepared(prepared)
    index = tokens.read_index(prepared)
    flat = _concat(prepared)
    assert len(index["shards"]) >= 5 and len(stream) == len(flat) == index["total_tokens"]
    assert all(isinstance(p, tokens.ShardFile) for p in stream.parts)
    # every window starting near a boundary, crossing it, and some far from one
    bounds = np.cumsum([s["tokens"] for s in index["shards"]])[:-1]
    starts = np.concatenate([bounds - 3, bounds - 17, bounds, [0, 5, len(flat) - 17]])
    got = stream.read(starts, 17)
    assert got.dtype == np.int32 and got.shape == (len(starts), 17)
    np.testing.assert_array_equal(got, flat[starts[:, None] + np.arange(17)])
    # a view reads relative to itself
    view = stream.view(1000, 9000)
    np.testing.assert_array_equal(view.read(np.array([0, 7990]), 10), flat[[np.arange(1000, 1010),
                                                                           np.arange(8990, 9000)]])
    np.testing.assert_array_equal(view.array(), flat[1000:9000])
    with pytest.raises(IndexError):
        view.read(np.array([7991]), 10)
    # documents end with the end-of-text id; decoding the rest gives the text back
    eot = tok.token_to_id(EOT)
    assert int((flat == eot).sum()) == index["total_documents"] == len(split_docs(text, 12)) > 10
    assert tok.decode([int(i) for i in flat if i != eot]) == text


def _mapped_shard_kb() -> int:
    """Resident kB of this process's mappings of shard files (/proc/self/smaps)."""
    total, name = 0, ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(" ", 1)[0]
        if "-" in first and ":" not in first:  # a mapping's header line: address range ... path
            name = line.split()[-1] if len(line.split()) >= 6 else ""
        elif line.startswith("Rss:") and "shard_" in name:
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_reading_windows_maps_no_shard_memory_into_the_process(tmp_path: Path):
    """Shards are read with pread: the pages stay in the page cache, none count as the
    process's resident memory (a memory map would count every page it touches, and more)."""
    ids = np.random.default_rng(0).integers(0, 60, 4_000_000).astype(np.uint16)
    out = write_ids(tmp_path / "big", ids)
    stream, _ = tokens.open_prepared(out)
    key = feeds.philox_key(jax.random.key(0))
    for s in range(100):
        batch = feeds.read_batch(stream, key, s, 0, (1, 12), 64)
    starts = feeds.draw_starts(key, 99, 0, (1, 12), len(ids) - 64)
    np.testing.assert_array_equal(batch[0], ids[starts[0, :, None] + np.arange(65)])
    assert _mapped_shard_kb() == 0
    mapped = np.memmap(out / "shard_00000.bin", np.uint16, mode="r")  # what a memory map costs
    for s in range(100):
        tokens.TokenStream([mapped], [0.0]).read(feeds.draw_starts(key, s, 0, (12,), len(ids) - 64), 65)
    print(f"\n[1200 windows of 65 tokens from an 8 MB shard] memory map: {_mapped_shard_kb()} kB resident; pread: 0")
    assert _mapped_shard_kb() > 1200 * 4 / 2  # at least half a page per window (the kernel maps more)


def test_bytes_prorated_by_tokens_within_a_shard(prepared: Path, text: str):
    stream, _ = tokens.open_prepared(prepared)
    index = tokens.read_index(prepared)
    assert stream.n_bytes == index["total_bytes"] == len(text.encode("utf-8"))
    first = index["shards"][0]
    half = stream.view(0, first["tokens"] // 2)
    assert half.n_bytes == pytest.approx(first["bytes"] * (first["tokens"] // 2) / first["tokens"])
    two = stream.view(0, first["tokens"] + index["shards"][1]["tokens"])
    assert two.n_bytes == first["bytes"] + index["shards"][1]["bytes"]


def test_damaged_prepared_dataset_errors_name_the_file(prepared: Path, tmp_path: Path):
    shard = prepared / "shard_00002.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=rf"^data_path: shard '{shard}' has {len(data) - 2} bytes, index.json says"):
        tokens.open_prepared(prepared)
    shard.unlink()
    with pytest.raises(DataError, match=rf"^data_path: shard '{shard}' listed in index.json is missing"):
        tokens.open_prepared(prepared)
    shard.write_bytes(data)
    tok_file = prepared / "tokenizer.json"
    tok_file.write_text(tok_file.read_text() + " ")
    with pytest.raises(DataError, match="tokenizer.json' does not match tokenizer_sha256 in index.json"):
        tokens.open_prepared(prepared)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="a folder without index.json, not a prepared dataset"):
        tokens.open_prepared(tmp_path / "folder")
    (tmp_path / "folder" / ".progress.json").write_text("{}")
    with pytest.raises(DataError, match="an unfinished prepare"):
        tokens.open_prepared(tmp_path / "folder")


def test_splits_of_a_prepared_dataset(prepared: Path, tmp_path: Path, text: str):
    cfg = Config(dim=32, n_heads=4, head_size=8, num_blocks=2, max_context=16, val_fraction=0.1)
    splits = tokens.open_splits(prepared, cfg)
    flat = _concat(prepared)
    n_val = int(len(flat) * 0.1)
    assert splits.prepared and len(splits.val) == n_val and len(splits.train) == len(flat) - n_val
    np.testing.assert_array_equal(splits.val.array(), flat[-n_val:])
    assert splits.train.n_bytes + splits.val.n_bytes == pytest.approx(len(text.encode()))
    capped = tokens.open_splits(prepared, cfg.replace(max_train_tokens=5000))
    assert len(capped.train) == 5000 and len(capped.val) == n_val
    # a separate validation set: all of data_path trains
    val_dir = write_prepared(tmp_path / "val", ["the queen of the night " * 20], splits.tokenizer)
    sep = tokens.open_splits(prepared, cfg.replace(val_path=str(val_dir)))
    assert len(sep.train) == len(flat)
    assert len(sep.val) == len("the queen of the night " * 20) + 1  # + the end-of-text id
    # ... or a text file, encoded with the run's tokenizer
    (tmp_path / "val.txt").write_text("a naïve king " * 10, encoding="utf-8")
    txt = tokens.open_splits(prepared, cfg.replace(val_path=str(tmp_path / "val.txt")), cache_dir=tmp_path)
    assert len(txt.val) == 130 and txt.val.n_bytes == len(("a naïve king " * 10).encode())
    with pytest.raises(DataError, match="^val_path: the validation split has 4 tokens"):
        (tmp_path / "short.txt").write_text("king", encoding="utf-8")
        tokens.open_splits(prepared, cfg.replace(val_path=str(tmp_path / "short.txt")), cache_dir=tmp_path)


def test_a_prepared_dataset_of_another_tokenizer_is_refused(prepared: Path, text: str):
    cfg = Config(dim=32, n_heads=4, head_size=8, num_blocks=2, max_context=16)
    other = char_tokenizer_with_eot(text + "Z")
    with pytest.raises(DataError, match=rf"^data_path: the prepared dataset '{prepared}' was tokenized with "
                                        rf"'{prepared / 'tokenizer.json'}', not with 'RUN/tokenizer.json'"):
        tokens.open_splits(prepared, cfg, other, "'RUN/tokenizer.json'")
    same = tk.load_tokenizer(prepared / "tokenizer.json")  # equal content: accepted
    assert tokens.open_splits(prepared, cfg, same, "x").tokenizer is same


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_raw_text_bytes_are_counted_token_by_token(kind: str, text: str, tmp_path: Path):
    tok = tk.build_tokenizer(kind, text, vocab_size=300)
    lengths = tokens.token_byte_lengths(tok)
    ids = np.asarray(tok.encode(text).ids)
    assert tokens.count_bytes(ids, lengths, chunk=1000) == len(text.encode("utf-8"))
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    cfg = Config(dim=32, n_heads=4, head_size=8, num_blocks=2, max_context=16, tokenizer_type=kind,
                 bpe_vocab_size=300, val_fraction=0.25)
    splits = tokens.open_splits(tmp_path / "c.txt", cfg)
    assert not splits.prepared and splits.tokenizer.to_str() == tok.to_str()
    n_val = len(splits.val)
    val_text = tok.decode([int(i) for i in splits.val.array()])  # the validation split's text
    assert splits.val.n_bytes == len(val_text.encode("utf-8")) and n_val == int(len(ids) * 0.25)
    assert splits.train.n_bytes + splits.val.n_bytes == len(text.encode("utf-8"))


def test_host_batches_are_pure_functions_of_the_key_and_step(prepared: Path):
    stream, _ = tokens.open_prepared(prepared)
    key = feeds.philox_key(jax.random.key(3))
    a = feeds.read_batch(stream, key, 7, tokens.TRAIN_STREAM, (2, 5), 16)
    b = feeds.read_batch(stream, key, 7, tokens.TRAIN_STREAM, (2, 5), 16)
    assert a.shape == (2, 5, 17) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    for other in (feeds.read_batch(stream, key, 8, tokens.TRAIN_STREAM, (2, 5), 16),
                  feeds.read_batch(stream, key, 7, tokens.EVAL_VAL_STREAM, (2, 5), 16),
                  feeds.read_batch(stream, feeds.philox_key(jax.random.key(4)), 7, 0, (2, 5), 16)):
        assert not np.array_equal(a, other)
    starts = feeds.draw_starts(key, 7, 0, (2, 5), len(stream) - 16)
    np.testing.assert_array_equal(a, stream.read(starts, 17).reshape(2, 5, 17))
    # uniform over every start that leaves a full window (a chi-square-free sanity check)
    many = feeds.draw_starts(key, 0, 0, (200_000,), 100)
    assert many.min() == 0 and many.max() == 99 and np.abs(np.bincount(many) / 2000 - 1).max() < 0.1


def test_prefetcher_keeps_order_runs_ahead_and_reraises():
    made: list[int] = []

    def make(s: int) -> int:
        made.append(s)
        if s == 6:
            raise OSError("disk gone")
        return s * s

    p = feeds.Prefetcher(make, 3, 10, depth=2)
    assert [p.get(s) for s in (3, 4, 5)] == [9, 16, 25]
    with pytest.raises(OSError, match="disk gone"):
        p.get(6)
    p.close()
    assert made == [3, 4, 5, 6]

    gate = threading.Event()
    slow = feeds.Prefetcher(lambda s: gate.wait() and s, 0, 100, depth=2)
    gate.set()
    time.sleep(0.2)
    assert slow._queue.qsize() == 2  # at most `depth` ahead
    assert slow.get(0) == 0
    slow.close()
    assert not slow._thread.is_alive()
    with pytest.raises(IndexError):
        feeds.Prefetcher(lambda s: s, 0, 2).get(2)


def test_choose_feed_by_size_and_kind(prepared: Path, tmp_path: Path, text: str, monkeypatch):
    cfg = Config(dim=32, n_heads=4, head_size=8, num_blocks=2, max_context=16)
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    raw = tokens.open_splits(tmp_path / "c.txt", cfg)
    assert feeds.choose_feed(raw) == "fused" and feeds.choose_feed(tokens.open_splits(prepared, cfg)) == "host"
    monkeypatch.setattr(feeds, "FUSED_MAX_BYTES", raw.train.nbytes + raw.val.nbytes - 1)
    assert feeds.choose_feed(raw) == "host"
    assert math.isclose(1 / raw.val.tokens_per_byte, raw.val.n_bytes / len(raw.val))
