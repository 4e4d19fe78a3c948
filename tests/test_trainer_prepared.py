"""Training on prepared datasets (issue 14): bits per byte, device memory O(batch), the
tokenizer check, exact resume after kill -9, 4 devices vs 1, and 2 processes x 2 devices that
each read only their own rows of every batch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dantinox_eqx.config import Config
from dantinox_eqx.data import DataError, feeds, tokens
from dantinox_eqx.run import checkpoint as ckpt
from dantinox_eqx.train.trainer import Trainer, read_log

from .prepared import char_tokenizer_with_eot, split_docs, write_ids, write_prepared
from .procs import device_env, free_port
from .test_tokens import synthetic_text
from .test_trainer import EXACT, EXE, _env, _leaves, _params_like, _train_and_kill, tiny
from .test_trainer_distributed import CFG, TIMEOUT_S, _same_curve

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def text() -> str:
    return synthetic_text(20_000)  # ~100k characters, multi-byte ones among them


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, text: str) -> Path:
    """The text as 30 documents in shards of ~20k tokens (windows cross shard boundaries)."""
    out = tmp_path_factory.mktemp("prep") / "ds"
    return write_prepared(out, split_docs(text, 30), char_tokenizer_with_eot(text), shard_tokens=20_000)


@pytest.mark.slow
def test_bits_per_byte_is_loss_over_ln2_times_tokens_per_byte(tmp_path: Path, text: str, prepared: Path):
    # raw text, char tokenizer: a split's tokens are its characters, its bytes their UTF-8 bytes
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    config = tiny(max_steps=4, eval_interval=4)
    rows = read_log(Trainer(config, progress=False).fit(corpus, run_dir=tmp_path / "raw") / "training_log.csv")
    n_val = int(len(text) * config.val_fraction)
    for split, part in (("val", text[-n_val:]), ("train", text[:-n_val])):
        want = rows[-1][f"{split}_loss"] / math.log(2) * len(part) / len(part.encode("utf-8"))
        assert rows[-1][f"{split}_bpb"] == pytest.approx(want, rel=1e-12)
    assert len(text.encode("utf-8")) > 1.1 * len(text)  # bytes and characters differ here

    # prepared: bytes from index.json, prorated within the shard that the split cuts
    run = Trainer(config, progress=False).fit(prepared, run_dir=tmp_path / "prep")
    row = read_log(run / "training_log.csv")[-1]
    index = json.loads((prepared / "index.json").read_text())
    total = index["total_tokens"]
    lo = total - int(total * config.val_fraction)
    val_bytes, at = 0.0, 0
    for s in index["shards"]:
        overlap = max(0, min(at + s["tokens"], total) - max(at, lo))
        val_bytes, at = val_bytes + s["bytes"] * overlap / s["tokens"], at + s["tokens"]
    assert row["val_bpb"] == pytest.approx(row["val_loss"] / math.log(2) * (total - lo) / val_bytes, rel=1e-12)
    summary = json.loads((run / "model_summary.json").read_text())["data"]
    assert summary["feed"] == "host" and summary["val_tokens"] == total - lo
    assert summary["val_bytes"] == round(val_bytes)


@pytest.mark.slow
def test_val_path_and_find_lr_on_a_prepared_dataset(tmp_path: Path, text: str, prepared: Path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(text[:5000], encoding="utf-8")  # encoded with the prepared tokenizer
    config = tiny(max_steps=2, eval_interval=2, val_path=str(held_out))
    run = Trainer(config, progress=False).fit(prepared, run_dir=tmp_path / "run")
    data = json.loads((run / "model_summary.json").read_text())["data"]
    index = json.loads((prepared / "index.json").read_text())
    assert data["train_tokens"] == index["total_tokens"] and data["val_tokens"] == 5000  # all of it trains
    assert data["val_bytes"] == len(text[:5000].encode("utf-8"))
    assert Config.from_yaml(run / "config.yaml").val_path == str(held_out.resolve())
    suggested, lrs, losses = Trainer(tiny()).find_lr(prepared, 1e-4, 1e-1, 6)  # batches read on the host
    assert len(lrs) == len(losses) == 6 and 1e-4 <= suggested <= 1e-1 * (1 + 1e-6)  # float32 schedule
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]


def test_eval_reports_bits_per_byte_of_the_scored_text(text: str):
    from dantinox_eqx.data.tokenizer import char_tokenizer
    from dantinox_eqx.infer.evaluate import evaluate
    from dantinox_eqx.model import Transformer

    part = text[:3000]
    tok = char_tokenizer(part)
    model = Transformer(tiny(vocab_size=tok.get_vocab_size()), key=jax.random.key(0))
    for batches in (None, 2):
        r = evaluate(model, tok, part, batch_size=4, n_batches=batches)
        if batches is None:  # every character after the first is scored: its bytes exactly
            assert r.n_bytes == len(part.encode("utf-8")) - len(part[0].encode("utf-8"))
        else:  # random windows: the text's bytes per token
            assert r.n_bytes == pytest.approx(r.n_tokens * len(part.encode("utf-8")) / len(part))
        assert r.n_bytes > 1.1 * r.n_chars
        assert r.bits_per_byte == pytest.approx(r.loss / math.log(2) * r.n_tokens / r.n_bytes, rel=1e-12)


def _live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


@pytest.mark.slow
@pytest.mark.parametrize("feed", ["host", "fused"])
def test_device_memory_is_O_batch_with_the_host_feed(tmp_path: Path, feed: str, monkeypatch):
    """Bytes of every live device array, measured at each evaluation: the host feed holds the
    model, its optimizer state and a few batches; the fused feed also the corpus (8 MB)."""
    ids = np.random.default_rng(0).integers(0, 60, 4_000_000).astype(np.uint16)
    out = write_ids(tmp_path / "big", ids)
    monkeypatch.setattr(feeds, "choose_feed", lambda splits: feed)
    seen: list[int] = []
    before = _live_bytes()  # arrays other tests left alive in this process
    Trainer(tiny(max_steps=4, eval_interval=2), loggers=[lambda row: seen.append(_live_bytes() - before)],
            progress=False).fit(out, run_dir=tmp_path / "run")
    print(f"\n[{feed} feed] live device bytes at each evaluation: {seen}; corpus {ids.nbytes}")
    if feed == "host":
        assert max(seen) < ids.nbytes / 8
    else:
        assert min(seen) > ids.nbytes


@pytest.mark.slow
def test_a_prepared_dataset_of_another_tokenizer_exits_2_naming_the_files(tmp_path: Path, text: str,
                                                                         prepared: Path):
    other = tmp_path / "other.json"
    other.write_text(char_tokenizer_with_eot(text + "Z").to_str(), encoding="utf-8")
    run = tmp_path / "run"
    proc = subprocess.run([str(EXE), "train", "--data_path", str(prepared), "--tokenizer_path", str(other),
                           "--run_dir", str(run)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0] == (f"Error: data_path: the prepared dataset '{prepared}' was tokenized with "
                        f"'{prepared / 'tokenizer.json'}', not with '{other}'; prepare it again with "
                        f"--tokenizer_path '{other}'")
    assert not run.exists()  # nothing written


@pytest.mark.slow
def test_resume_after_sigkill_on_a_prepared_dataset_gives_identical_rows(tmp_path: Path, text: str,
                                                                        prepared: Path):
    config = tiny(max_steps=60, eval_interval=10, dropout_rate=0.1)
    killed = tmp_path / "killed"
    assert 30 <= _train_and_kill(tmp_path, config, prepared, killed, 30) < 60  # killed mid-run

    Trainer(config, progress=False).fit(None, run_dir=killed, resume=True)  # data_path from the cursor
    reference = Trainer(config, progress=False).fit(prepared, run_dir=tmp_path / "reference")
    got, want = read_log(killed / "training_log.csv"), read_log(reference / "training_log.csv")
    assert len(want) == 6 and "val_bpb" in EXACT
    assert [{k: r[k] for k in EXACT} for r in got] == [{k: r[k] for k in EXACT} for r in want]
    _, (params, _) = _params_like(reference)
    a, b = ckpt.restore(killed, ckpt.LATEST, params)[:2], ckpt.restore(reference, ckpt.LATEST, params)[:2]
    assert a[0] == b[0] == 60
    for x, y in zip(_leaves(a[1]), _leaves(b[1])):
        np.testing.assert_array_equal(x, y)  # bitwise

    # resuming on a prepared dataset made with another tokenizer is refused, nothing changes
    files = {p: p.stat().st_mtime_ns for p in killed.rglob("*")}
    other = write_prepared(tmp_path / "other", [text + "Z"], char_tokenizer_with_eot(text + "Z"))
    with pytest.raises(DataError, match=rf"was tokenized with .*, not with '{killed / 'tokenizer.json'}'"):
        Trainer(config.replace(max_steps=80), progress=False).fit(other, run_dir=killed, resume=True)
    assert {p: p.stat().st_mtime_ns for p in killed.rglob("*")} == files


@pytest.fixture(scope="module")
def dist_config(tmp_path_factory) -> tuple[Config, Path]:
    config = Config(**CFG)
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    config.to_yaml(path)
    return config, path


@pytest.fixture(scope="module")
def one_device(dist_config, prepared: Path, tmp_path_factory) -> Path:
    config, _ = dist_config
    return Trainer(config.replace(n_devices=1), progress=False).fit(
        prepared, run_dir=tmp_path_factory.mktemp("one") / "run")


@pytest.mark.slow
def test_4_devices_train_like_1_on_a_prepared_dataset(dist_config, prepared: Path, one_device: Path,
                                                      tmp_path: Path):
    _, cfg_file = dist_config
    proc = subprocess.run([sys.executable, str(HERE / "trainer_driver.py"), str(cfg_file), str(prepared),
                           str(tmp_path)], env=device_env(4), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = read_log(one_device / "training_log.csv")
    for mode in ("dp4", "fsdp4"):
        assert json.loads((tmp_path / mode / "model_summary.json").read_text())["data"]["feed"] == "host"
        _same_curve(read_log(tmp_path / mode / "training_log.csv"), want, f"prepared, {mode} vs 1 device")
    assert want[-1]["val_loss"] < want[0]["val_loss"] - 0.3  # it learns


@pytest.mark.slow
def test_2_processes_read_only_their_own_rows(dist_config, prepared: Path, one_device: Path, tmp_path: Path):
    config, cfg_file = dist_config
    port, procs = free_port(), []
    for i in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "loader_driver.py"), str(prepared), str(cfg_file), str(tmp_path),
             "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)],
            env=device_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]

    # The batches of a single process, from the same keys (Trainer.fit's split of the seed).
    splits = tokens.open_splits(prepared, config)
    _, data_key, _, eval_key = jax.random.split(jax.random.key(config.seed), 4)
    B, T = config.batch_size, config.max_context
    full = {("train", s): feeds.draw_starts(feeds.philox_key(data_key), s, tokens.TRAIN_STREAM,
                                             (config.grad_accum, B), len(splits.train) - T) for s in range(3)}
    for which, stream, sid in (("eval_train", splits.train, tokens.EVAL_TRAIN_STREAM),
                               ("eval_val", splits.val, tokens.EVAL_VAL_STREAM)):
        full[which, 3] = feeds.draw_starts(feeds.philox_key(eval_key), 3, sid, (config.eval_iters, B),
                                            len(stream) - T)
    records = [json.loads((tmp_path / f"reads_{i}.json").read_text()) for i in range(2)]
    for (which, step), starts in full.items():
        rows = [set() for _ in range(2)]
        for i, rec in enumerate(records):
            for r in (r for r in rec["reads"] if (r["split"], r["step"]) == (which, step)):
                a, b = r["rows"]
                rows[i] |= set(range(a, b))
                np.testing.assert_array_equal(np.asarray(r["starts"]), starts[:, a:b])  # the right windows
        print(f"\n[{which} step {step}] process 0 read rows {sorted(rows[0])}, process 1 rows {sorted(rows[1])}")
        assert rows[0] == set(range(B // 2)) and rows[1] == set(range(B // 2, B))  # disjoint, together all
        stream = splits.train if which != "eval_val" else splits.val
        batch = stream.read(starts, T + 1).reshape(*starts.shape, T + 1)
        for rec in records:  # the tokens placed on each process's devices are those rows' windows
            for p in (p for p in rec["placed"] if (p["split"], p["step"]) == (which, step)):
                a, b = p["rows"]
                np.testing.assert_array_equal(np.asarray(p["tokens"]), batch[:, a:b])
    _same_curve(read_log(tmp_path / "run" / "training_log.csv"), read_log(one_device / "training_log.csv"),
                "prepared, 2 processes x 2 devices vs 1 device")
