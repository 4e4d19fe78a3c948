"""`prepare`: sources streamed into token shards (issue 14). Synthetic text only; no network."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dantinox_eqx.data import DataError, sources
from dantinox_eqx.data import tokenizer as tk
from dantinox_eqx.data.prepare import INDEX_FILE, PROGRESS_FILE, TOKENIZER_FILE, prepare_dataset, read_index

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in a is that it was for on are with as his they be at one have this from "
         "naïve café über — ✓ 日本 😀 don't I'll").split()


def make_text(n_lines: int, seed: int) -> str:
    """Lines of random words with the whitespace that matters to cuts: blank lines, leading and
    trailing spaces, tabs, a line of punctuation."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 12))))
        lines.append(rng.choice(["", " ", "\t", "  "], p=[0.7, 0.1, 0.1, 0.1]) + words +
                     rng.choice(["", ".", " ", "?!"]))
        if rng.random() < 0.1:
            lines.append("")
    return "\n".join(lines) + "\n"


def stream(out: Path) -> np.ndarray:
    """The token stream of a prepared dataset: its shards, memory-mapped, concatenated."""
    index = read_index(out)
    return np.concatenate([np.memmap(out / s["file"], dtype=index["dtype"], mode="r") for s in index["shards"]])


def docs_folder(root: Path, texts: list[str]) -> Path:
    root.mkdir(parents=True)
    for i, text in enumerate(texts):
        (root / f"doc_{i:02d}.txt").write_text(text, encoding="utf-8")
    return root


def run_cli(monkeypatch, capsys, *args: str | Path) -> tuple[int, str, str]:
    """`dantinox-eqx prepare ...` through the real entry point, in this process."""
    from cli.main import main

    monkeypatch.setattr(sys, "argv", ["dantinox-eqx", "prepare", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


# ------------------------------------------------------------------------------ tokenizers
def test_new_tokenizers_append_special_tokens_after_the_ordinary_ids(tmp_path):
    text = make_text(200, 0)
    old = Tokenizer(models.WordLevel({c: i for i, c in enumerate(sorted(set(text)))}, unk_token=None))
    char = tk.char_tokenizer(text)
    n = len(set(text))
    assert char.get_vocab_size() == n + 2 and tk.eot_id(char) == n and char.token_to_id(tk.UNK) == n + 1
    assert {c: char.token_to_id(c) for c in set(text)} == old.get_vocab()  # ordinary ids unchanged
    bpe = tk.train_bpe(text.splitlines(keepends=True), 300)
    assert tk.eot_id(bpe) == bpe.get_vocab_size() - 1 <= 299
    for tok in (char, bpe):  # a Hugging Face client sees them as special: decode drops them
        tk.save_tokenizer(tok, tmp_path / "t.json")
        loaded = Tokenizer.from_file(str(tmp_path / "t.json"))
        ids = loaded.encode("the of").ids
        assert loaded.decode(ids + [tk.eot_id(loaded)]) == "the of"
        assert tk.digest(loaded) == hashlib.sha256((tmp_path / "t.json").read_bytes()).hexdigest()


def test_unknown_chars_error_or_drop():
    tok = tk.char_tokenizer("abc ")
    with pytest.raises(tk.TokenizerError, match="outside the char vocabulary.*unknown_chars: drop"):
        tk.encode(tok, "ab zé")
    assert tk.encode(tok, "ab zé", "drop") == tk.encode(tok, "ab ")
    with pytest.raises(tk.TokenizerError, match="unknown_chars"):
        tk.encode(tok, "ab", "keep")


@pytest.mark.parametrize("special", [True, False])
def test_char_lookup_table_gives_the_libraries_ids(special):
    text = make_text(300, 1) + "\r\n\x0b\u3000\U0001f600<|>x"
    if special:
        tok = tk.char_tokenizer(text)
    else:  # a char tokenizer written before special tokens existed
        tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(sorted(set(text)))}, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    assert tk.char_table(tok) is not None
    parts = [text[:1000], text[1000:]]
    got = tk.batch_encoder(tok)(parts + ["<|endoftext|>"])
    assert [g.tolist() for g in got[:2]] == [tok.encode(p).ids for p in parts]
    # the name of a special token inside a document stays text: only prepare's separators are EOT
    assert got[2].tolist() == [tok.token_to_id(c) for c in "<|endoftext|>"]
    bpe = tk.train_bpe([text], 300)
    assert tk.char_table(bpe) is None
    assert tk.batch_encoder(bpe)(["<|endoftext|>"])[0].tolist() != [tk.eot_id(bpe)]


def test_long_documents_are_cut_where_bpe_gives_the_same_ids(tmp_path):
    """A document read in small pieces encodes to exactly the ids of the whole text."""
    text = make_text(3000, 2)
    bpe = tk.train_bpe([text], 400)
    file = tmp_path / "doc.txt"
    file.write_text(text, encoding="utf-8")
    pieces = list(sources.open_source(file, piece_bytes=4096).pieces())
    assert len(pieces) > 10 and all(p.nbytes <= 4096 for p in pieces)
    assert "".join(p.text for p in pieces) == text and [p.doc_end for p in pieces].count(True) == 1
    for tok in (bpe, tk.char_tokenizer(text)):
        ids = np.concatenate(tk.batch_encoder(tok)([p.text for p in pieces]))
        np.testing.assert_array_equal(ids, tok.encode(text).ids)
        cut = np.concatenate(tk.batch_encoder(tok)(list(sources.cut_text(text, 4096))))
        np.testing.assert_array_equal(cut, ids)
    # resuming at any piece's position reads the same pieces from there
    again = list(sources.open_source(file, piece_bytes=4096).pieces(pieces[4].position))
    assert [p.text for p in again] == [p.text for p in pieces[5:]]


# ------------------------------------------------------------------------------ prepare
def test_prepared_folder_is_the_documents_each_followed_by_end_of_text(tmp_path):
    texts = [make_text(40, s) for s in range(6)]
    folder = docs_folder(tmp_path / "src", texts)
    (folder / "empty.txt").write_text("")  # no document
    (folder / ".hidden").write_bytes(b"\0\1")  # skipped
    (folder / "sub").mkdir()
    (folder / "sub" / "more.txt").write_text("deeper text\n")
    out = prepare_dataset(folder, tmp_path / "out", shard_tokens=700, progress=False)
    index = read_index(out)
    tok = Tokenizer.from_file(str(out / TOKENIZER_FILE))
    eot = index["eot_id"]
    docs = texts + ["deeper text\n"]
    assert eot == tk.eot_id(tok) and index["vocab_size"] == tok.get_vocab_size() and index["dtype"] == "uint16"
    expected = np.concatenate([tok.encode(t).ids + [eot] for t in docs])
    np.testing.assert_array_equal(stream(out), expected)
    assert index["total_tokens"] == len(expected) and index["total_documents"] == len(docs) == 7
    assert index["total_bytes"] == sum(len(t.encode()) for t in docs)
    assert index["tokenizer_sha256"] == hashlib.sha256((out / TOKENIZER_FILE).read_bytes()).hexdigest()
    assert index["source"]["kind"] == "folder" and index["source"]["spec"] == str(folder.absolute())
    shards = index["shards"]
    assert len(shards) > 2 and all(s["tokens"] >= 700 for s in shards[:-1])
    for s in shards:  # cut at document ends: every shard ends with end-of-text
        data = np.memmap(out / s["file"], dtype=np.uint16, mode="r")
        assert len(data) == s["tokens"] and data[-1] == eot and (data == eot).sum() == s["documents"]
    assert sorted(p.name for p in out.iterdir()) == [INDEX_FILE, *[s["file"] for s in shards], TOKENIZER_FILE]


def test_text_jsonl_parquet_and_hf_give_the_same_stream(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [make_text(30, s) for s in range(5)]
    tok = tk.char_tokenizer("".join(texts))
    tk.save_tokenizer(tok, tmp_path / "tok.json")
    folder = docs_folder(tmp_path / "folder", texts)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(texts)) + "\n\n")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": texts, "n": list(range(5))}), parquet, row_group_size=2)
    streams = {}
    for name, src in (("folder", folder), ("jsonl", jsonl), ("parquet", parquet)):
        out = prepare_dataset(src, tmp_path / f"out_{name}", tokenizer=tmp_path / "tok.json", text_field="body",
                              shard_tokens=500, progress=False)
        streams[name] = stream(out)
        index = read_index(out)
        assert index["source"]["kind"] == name and index["total_documents"] == 5
        assert index["total_bytes"] == sum(len(t.encode()) for t in texts)
    out = prepare_dataset(str(folder / "doc_0*.txt"), tmp_path / "out_glob", tokenizer=tok, progress=False)
    assert read_index(out)["source"]["kind"] == "folder"
    assert read_index(out)["source"]["sha256"] == read_index(tmp_path / "out_folder")["source"]["sha256"]
    np.testing.assert_array_equal(stream(out), streams["folder"])
    np.testing.assert_array_equal(streams["jsonl"], streams["folder"])
    np.testing.assert_array_equal(streams["parquet"], streams["folder"])
    # a single text file is one document
    out = prepare_dataset(folder / "doc_00.txt", tmp_path / "one", tokenizer=tok, progress=False)
    assert read_index(out)["source"]["kind"] == "text" and read_index(out)["total_documents"] == 1

    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "hf_saved"
    datasets.Dataset.from_dict({"body": texts, "n": list(range(5))}).save_to_disk(str(saved))
    for streaming in (False, True):
        hf = sources.HFDataset(str(saved), split="train", text_field="body", streaming=streaming)
        out = prepare_dataset(hf, tmp_path / f"out_hf_{streaming}", tokenizer=tok, shard_tokens=500, progress=False)
        np.testing.assert_array_equal(stream(out), streams["folder"])
        assert read_index(out)["source"]["kind"] == "hf"
    with pytest.raises(DataError, match="has no field 'text'"):
        prepare_dataset(sources.HFDataset(str(saved)), tmp_path / "bad_hf", tokenizer=tok, progress=False)
    assert not (tmp_path / "bad_hf").exists()


def test_hf_source_from_config_fields_on_the_cli(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    texts = [make_text(30, s) for s in range(5)]
    tok = tk.char_tokenizer("".join(texts))
    tk.save_tokenizer(tok, tmp_path / "tok.json")
    saved = tmp_path / "hf_saved"
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(saved))
    expected = np.concatenate([tok.encode(t).ids + [tk.eot_id(tok)] for t in texts])
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  dataset_source: hf\n  dataset_name: {saved}\n  dataset_text_field: body\n"
                      f"  streaming: true\ntokenizer:\n  tokenizer_path: {tmp_path / 'tok.json'}\n")
    code, out, err = run_cli(monkeypatch, capsys, "--config", config, tmp_path / "a")  # SOURCE = dataset_name
    assert code == 0, err
    np.testing.assert_array_equal(stream(tmp_path / "a"), expected)
    code, out, err = run_cli(monkeypatch, capsys, "--dataset_source", "hf", saved, tmp_path / "b",
                             "--text_field", "body", "--tokenizer_path", tmp_path / "tok.json")
    assert code == 0, err
    np.testing.assert_array_equal(stream(tmp_path / "b"), expected)
    code, out, err = run_cli(monkeypatch, capsys, "--dataset_source", "hf", tmp_path / "c")
    assert code == 2 and "dataset_name: dataset_source is hf but no dataset is named" in err
    code, out, err = run_cli(monkeypatch, capsys, tmp_path / "c")
    assert code == 2 and "give SOURCE and OUT_DIR" in err and not (tmp_path / "c").exists()


def test_config_fields_of_the_data_path():
    from dantinox_eqx.config import Config, ConfigError

    with pytest.raises(ConfigError, match="unknown_chars: unknown value 'keep'"):
        Config(unknown_chars="keep")
    with pytest.raises(ConfigError, match="dataset_source: unknown value 'hub'"):
        Config(dataset_source="hub")
    c = Config.from_dict({"data": {"dataset_source": "hf", "dataset_name": "x/y", "streaming": True}})
    assert (c.dataset_source, c.dataset_name, c.streaming, c.dataset_split) == ("hf", "x/y", True, "train")


def test_given_tokenizers_gpt2_style_old_char_and_unknown_chars(tmp_path, monkeypatch, capsys):
    texts = [make_text(20, s) for s in range(3)]
    folder = docs_folder(tmp_path / "src", texts)
    # a GPT-2-style tokenizer.json: byte-level BPE, <|endoftext|> its last (special) token
    gpt2 = Tokenizer(models.BPE())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2.decoder = decoders.ByteLevel()
    gpt2.post_processor = processors.ByteLevel(trim_offsets=False)
    gpt2.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    gpt2.add_special_tokens(["<|endoftext|>"])
    (tmp_path / "gpt2").mkdir()
    gpt2.save(str(tmp_path / "gpt2" / "tokenizer.json"))
    code, out_text, err = run_cli(monkeypatch, capsys, folder, tmp_path / "g",
                                  "--tokenizer_path", tmp_path / "gpt2" / "tokenizer.json")
    assert code == 0, err
    index = read_index(tmp_path / "g")
    assert index["eot_id"] == gpt2.token_to_id("<|endoftext|>") and "prepared" in out_text
    np.testing.assert_array_equal(stream(tmp_path / "g"),
                                  np.concatenate([gpt2.encode(t).ids + [index["eot_id"]] for t in texts]))
    # an old char tokenizer (no end-of-text token): documents joined, eot_id null, ids kept
    old = Tokenizer(models.WordLevel({c: i for i, c in enumerate(sorted(set("".join(texts))))}, unk_token=None))
    old.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    out = prepare_dataset(folder, tmp_path / "old", tokenizer=old, progress=False)
    assert read_index(out)["eot_id"] is None
    np.testing.assert_array_equal(stream(out), old.encode("".join(texts)).ids)
    # characters outside a given char vocabulary: refused before writing, or dropped
    small = tk.char_tokenizer(texts[0])
    (folder / "extra.txt").write_text("Zebra ß\n")
    with pytest.raises(tk.TokenizerError, match="outside the char vocabulary.*unknown_chars: drop"):
        prepare_dataset(folder, tmp_path / "strict", tokenizer=small, progress=False)
    assert not (tmp_path / "strict").exists()
    out = prepare_dataset(folder, tmp_path / "drop", tokenizer=small, unknown_chars="drop", progress=False)
    expected = np.concatenate([tk.encode(small, t, "drop") + [tk.eot_id(small)] for t in texts + ["Zebra ß\n"]])
    np.testing.assert_array_equal(stream(out), expected)


@pytest.mark.slow
def test_killed_prepare_resumes_byte_identical(tmp_path):
    """kill -9 (a real SIGKILL, at a reproducible point: a test-only variable) half-way; the
    rerun resumes and ends with the files of an uninterrupted prepare."""
    texts = [make_text(30, s) for s in range(12)] + [make_text(5000, 99)]  # the last: 3 pieces
    folder = docs_folder(tmp_path / "src", texts)
    args = [sys.executable, "-m", "cli.main", "prepare", str(folder), "--tokenizer_type", "bpe",
            "--bpe_vocab_size", "300", "--shard_tokens", "400"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "JAX_PLATFORMS": "cpu"}

    def run(out: Path, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args, str(out)], env={**env, **extra}, capture_output=True, text=True,
                              timeout=300, cwd=ROOT)

    assert run(tmp_path / "whole").returncode == 0
    killed = run(tmp_path / "resumed", DANTINOX_EQX_PREPARE_KILL_AFTER_SHARDS="3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert PROGRESS_FILE in left and INDEX_FILE not in left and ".shard_00003.bin.tmp" in left
    assert [n for n in left if n.startswith("shard_")] == [f"shard_{i:05d}.bin" for i in range(3)]
    again = run(tmp_path / "resumed")
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr and "3 shard(s) done" in again.stderr
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    resumed = {p.name: p.read_bytes() for p in (tmp_path / "resumed").iterdir()}
    index = json.loads(whole[INDEX_FILE])
    assert len(index["shards"]) > 6 and index["shards"][-2]["documents"] == 0  # the long document cut inside
    assert resumed == whole  # shards, tokenizer.json and index.json, byte for byte


def test_same_source_again_is_already_prepared(tmp_path):
    folder = docs_folder(tmp_path / "src", [make_text(20, 0), make_text(20, 1)])
    out = prepare_dataset(folder, tmp_path / "out", progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare_dataset(folder, out, progress=False)
    os.utime(folder / "doc_00.txt")  # touched, same bytes: scanned, still the same source
    prepare_dataset(folder, out, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # killed before its first .progress.json: only tokenizer.json and a temporary are left
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / TOKENIZER_FILE).write_text("{}")
    (fresh / ".index.json.x.tmp").write_text("")
    prepare_dataset(folder, fresh, progress=False)
    assert (fresh / TOKENIZER_FILE).read_bytes() == (out / TOKENIZER_FILE).read_bytes()
    assert sorted(p.name for p in fresh.iterdir()) == sorted(before)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not a prepared dataset"):
        prepare_dataset(folder, tmp_path / "other", progress=False)


# ------------------------------------------------------------------------------ bad input
def _bad(tmp_path: Path, case: str) -> tuple[list[str | Path], str]:
    """The CLI arguments of one bad input, and what its one-line error must say."""
    out = tmp_path / "out"
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        return [tmp_path / "empty", out], "the folder .*empty' holds no files"
    if case == "malformed jsonl":
        (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
        return [tmp_path / "d.jsonl", out], r"d\.jsonl:3 is not a JSON object .*fix or remove that line"
    if case == "jsonl without the field":
        (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
        return [tmp_path / "d.jsonl", out], r"d\.jsonl:2 has no 'text' field \(it has: body\); pass --text_field"
    if case == "binary file in a text folder":
        docs_folder(tmp_path / "f", ["some text\n", "more text\n"])
        (tmp_path / "f" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
        return [tmp_path / "f", out], r"image\.png' is a binary file \(NUL byte at offset 8\)"
    if case == "parquet without the column":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "d.parquet")
        return [tmp_path / "d.parquet", out], r"d\.parquet' has no column 'text' \(columns: content\)"
    assert case == "prepared directory of another source"
    docs_folder(tmp_path / "a", ["first source\n"])
    docs_folder(tmp_path / "b", ["second source\n"])
    prepare_dataset(tmp_path / "a", out, progress=False)
    return [tmp_path / "b", out], "out_dir: .*out' already holds a prepared dataset of another source"


@pytest.mark.parametrize("case", ["empty folder", "malformed jsonl", "jsonl without the field",
                                  "binary file in a text folder", "parquet without the column",
                                  "prepared directory of another source"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, case):
    import re

    args, message = _bad(tmp_path, case)
    out = Path(args[-1])
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert re.search(message, lines[-1]) and lines[-1].startswith("Error: "), stderr
    assert not any(line.startswith("Error") for line in lines[:-1]) and "Traceback" not in stderr
    after = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
    assert after == before  # nothing written (no directory, or the other source's files untouched)


def test_unknown_chars_reach_training_data_and_eval(tmp_path):
    """Fine-tuning (data.prepare_data with the base's tokenizer) and eval drop the characters
    a char vocabulary lacks when asked, and refuse them by default."""
    import jax

    from dantinox_eqx.config import Config
    from dantinox_eqx.data import sampling as data
    from dantinox_eqx.infer.evaluate import evaluate
    from dantinox_eqx.model import Transformer

    from .conftest import TINY

    text = make_text(200, 5)
    tok = tk.char_tokenizer(text)
    extra = "Zß" * 3
    (tmp_path / "new.txt").write_text(extra + text)
    with pytest.raises(DataError, match="outside the char vocabulary"):
        data.prepare_data(tmp_path / "new.txt", tokenizer_type="char", max_context=16, tokenizer=tok)
    dropped = data.prepare_data(tmp_path / "new.txt", tokenizer_type="char", max_context=16, tokenizer=tok,
                                unknown_chars="drop", cache_dir=tmp_path)
    np.testing.assert_array_equal(np.concatenate([dropped.train, dropped.val]), tok.encode(text).ids)
    model = Transformer(Config(**{**TINY, "vocab_size": tok.get_vocab_size()}), key=jax.random.key(0))
    with pytest.raises(tk.TokenizerError, match="unknown_chars: drop"):
        evaluate(model, tok, extra + text[:300], batch_size=4)
    assert evaluate(model, tok, extra + text[:300], batch_size=4, unknown_chars="drop") == \
        evaluate(model, tok, text[:300], batch_size=4)


def test_prepare_and_the_loader_read_the_index_one_way(tmp_path):
    """One reader of index.json (data/index.py): what `prepare` reports is checked as the
    loader checks it, so a dataset with a missing shard is refused by both."""
    from dantinox_eqx.data import index, prepare, tokens

    assert prepare.read_index is tokens.read_index is index.read_index
    out = prepare_dataset(docs_folder(tmp_path / "src", [make_text(100, seed) for seed in range(4)]),
                          tmp_path / "out", shard_tokens=1000, progress=False)
    shards = read_index(out)["shards"]
    assert len(shards) > 1
    (out / shards[1]["file"]).unlink()
    with pytest.raises(DataError, match=rf"^data_path: shard '{out / shards[1]['file']}' listed in index.json "
                                        r"is missing; prepare the dataset again"):
        read_index(out)
