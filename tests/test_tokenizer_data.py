import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, pre_tokenizers

from dantinox_eqx.data import sampling as data
from dantinox_eqx.data import tokenizer

from .conftest import plays_text


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip_exact(kind, shakespeare, tmp_path):
    text = shakespeare.read_text(encoding="utf-8")[:200_000] + "\nnaïve café — ünïcødé ✓\r\n\tend\n"
    tok = tokenizer.build_tokenizer(kind, text, vocab_size=1000)
    tokenizer.save_tokenizer(tok, tmp_path / "tokenizer.json")
    loaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # the standard loader
    ids = loaded.encode(text).ids
    assert loaded.decode(ids) == text
    if kind == "bpe":
        assert loaded.get_vocab_size() == 1000 and len(ids) < 0.55 * len(text)
    else:
        # every character, then <|endoftext|> and [UNK] (issue 14: appended, ordinary ids unchanged)
        assert len(ids) == len(text) and loaded.get_vocab_size() == len(set(text)) + 2


def test_char_rejects_unknown_characters():
    tok = tokenizer.char_tokenizer("abc")
    with pytest.raises(tokenizer.TokenizerError, match="outside the char vocabulary"):
        tokenizer.encode(tok, "abz")


def test_token_cache_reused_and_invalidated(small_corpus):
    tok = tokenizer.char_tokenizer(small_corpus.read_text())
    a = data.encode_corpus(small_corpus, tok)
    caches = list(small_corpus.parent.glob("*.tokens.npy"))
    assert len(caches) == 1 and isinstance(a, np.memmap)
    b = data.encode_corpus(small_corpus, tok)
    np.testing.assert_array_equal(a, b)
    assert len(list(small_corpus.parent.glob("*.tokens.npy"))) == 1  # reused
    small_corpus.write_text(small_corpus.read_text() + "more")
    data.encode_corpus(small_corpus, tok)
    assert len(list(small_corpus.parent.glob("*.tokens.npy"))) == 2  # changed corpus: new cache


def test_data_errors(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.read_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(data.DataError, match="empty"):
        data.read_corpus(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"hello \xff\xfe world")
    with pytest.raises(data.DataError, match="offset 6"):
        data.read_corpus(tmp_path / "bin.txt")
    (tmp_path / "short.txt").write_text("short text here")
    with pytest.raises(data.DataError, match="max_context"):
        data.prepare_data(tmp_path / "short.txt", tokenizer_type="char", max_context=64)


def test_batches_are_pure_functions_of_the_key(small_corpus):
    ds = data.prepare_data(small_corpus, tokenizer_type="char", max_context=16)
    tokens = jax.numpy.asarray(ds.train)
    k = jax.random.key(3)
    a = data.sample_batch(tokens, k, 4, 16, accum=2)
    b = data.sample_batch(tokens, k, 4, 16, accum=2)
    c = data.sample_batch(tokens, jax.random.key(4), 4, 16, accum=2)
    assert a.shape == (2, 4, 17) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # every window is a contiguous slice of the corpus
    row = np.asarray(a[0, 0])
    starts = [i for i in range(len(ds.train) - 16) if ds.train[i] == row[0] and
              np.array_equal(ds.train[i:i + 17], row)]
    assert starts


def test_no_cache_file_in_a_read_only_corpus_folder(small_corpus, tmp_path):
    """Even as root (access() says yes), a folder without write bits gets no cache file."""
    import os
    import stat

    folder = small_corpus.parent
    tok = tokenizer.char_tokenizer(small_corpus.read_text())
    os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR)
    try:
        ids = data.encode_corpus(small_corpus, tok)
        assert not list(folder.glob("*.tokens.npy")) and len(ids) == len(small_corpus.read_text())
        cache = tmp_path / "cache"
        cache.mkdir()
        data.encode_corpus(small_corpus, tok, cache_dir=cache)
        assert len(list(cache.glob("*.tokens.npy"))) == 1
    finally:
        os.chmod(folder, stat.S_IRWXU)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_encode_text_gives_the_ids_of_the_whole_text_in_bounded_pieces(kind):
    """`encode_text` (what a text corpus is encoded with: a lookup table, or byte-level BPE in
    pieces cut where pre-tokens end) equals the library's encoding of the whole text, bitwise."""
    text = plays_text()[:200_000] + "naïve café — 東京 🙂 \t tabs  and   spaces <a|b>\n\n\nend"
    tok = tokenizer.build_tokenizer(kind, text, 400)
    whole = np.asarray(tokenizer.encode(tok, text), np.int32)
    pieces = list(tokenizer._pieces(text, 2000))
    assert len(pieces) > 90 and "".join(pieces) == text  # about 100 cuts, nothing lost
    np.testing.assert_array_equal(tokenizer.encode_text(tok, text, piece_chars=2000), whole)
    # a special token's name in the text: the library matches it first; encoded whole, the same ids
    special = text[:5000] + "<|endoftext|>" + text[5000:10000]
    np.testing.assert_array_equal(tokenizer.encode_text(tok, special, piece_chars=2000),
                                  tokenizer.encode(tok, special))
    if kind == "char":  # characters outside the vocabulary: refused naming them, or dropped
        small = tokenizer.build_tokenizer(kind, text[:1000])
        with pytest.raises(tokenizer.TokenizerError, match="outside the char vocabulary"):
            tokenizer.encode_text(small, text)
        np.testing.assert_array_equal(tokenizer.encode_text(small, text, "drop"),
                                      tokenizer.encode(small, text, "drop"))


def test_only_tokenizers_that_split_exactly_are_encoded_in_pieces():
    text = plays_text()[:20_000]
    ours = tokenizer.build_tokenizer("bpe", text, 300)
    assert tokenizer._splits_exactly(ours)
    prefixed = Tokenizer.from_str(ours.to_str())
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # a space added per piece
    assert not tokenizer._splits_exactly(prefixed)
    np.testing.assert_array_equal(tokenizer.encode_text(prefixed, text, piece_chars=500),
                                  tokenizer.encode(prefixed, text))  # encoded whole
