"""The documentation keeps its promises: every Python path it names imports, every module of the
package has an API reference entry, and every example in the guides runs (or is marked as an
illustration that needs a GPU, a hub download, another machine or hours, with the reason).

Examples: each fenced ```python / ```bash block of README.md, docs/index.md and docs/guides/*.md runs, in
order, in one temporary folder per page (so a later block sees the runs an earlier one wrote),
which holds `corpus.txt` and `new.txt` (text from the installed corpus).
A block right after a line `<!-- not run: REASON -->` is an illustration and is skipped; a
`text` block is output, never run. The `site` build itself (`nox -s docs`, mkdocs --strict)
checks links and references.
"""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDES = [ROOT / "README.md", DOCS / "index.md", *sorted((DOCS / "guides").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)?[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->\s*$")


def blocks(path: Path) -> list[tuple[str, str, str | None]]:
    """(language, code, reason it is not run or None) for each fenced block of `path`."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NOT_RUN.search(before)
        out.append((m.group(1) or "", m.group(2), reason.group(1) if reason else None))
    return out


def _dotted_paths(text: str) -> set[str]:
    return set(re.findall(r"\bdantinox_eqx(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text))


def _resolves(path: str) -> bool:
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def test_every_python_path_in_the_docs_imports():
    files = [ROOT / "README.md", *DOCS.rglob("*.md")]
    missing = sorted({(f.relative_to(ROOT).as_posix(), p) for f in files for p in _dotted_paths(f.read_text())
                      if not _resolves(p)})
    assert not missing, f"documented paths that do not import: {missing}"


def _python_imports(code: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dantinox_eqx"):
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_every_import_in_a_docs_example_resolves():
    """Illustrations too: an example that is not run still names real functions."""
    bad = []
    for f in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        for lang, code, _ in blocks(f):
            if lang == "python":
                bad += [(f.name, p) for p in _python_imports(code) if not _resolves(p)]
    assert not bad, bad


def test_every_module_has_an_api_reference_entry():
    import dantinox_eqx

    listed = set()
    for page in (DOCS / "api").glob("*.md"):
        listed |= set(re.findall(r"^::: (\S+)", page.read_text(), re.MULTILINE))
    modules = {m.name for m in pkgutil.walk_packages(dantinox_eqx.__path__, "dantinox_eqx.") if not m.ispkg}
    missing = sorted(m for m in modules if m not in listed and m.rsplit(".", 1)[-1] != "__main__")
    assert not missing, f"modules with no API reference entry (add `::: name` to a docs/api page): {missing}"
    unknown = sorted(m for m in listed if m != "dantinox_eqx" and m not in modules)
    assert not unknown, f"API reference entries naming no module: {unknown}"


def test_every_guide_block_is_run_or_marked():
    """The marker needs a reason; a block of an unknown language is neither run nor allowed."""
    for f in GUIDES:
        for lang, _, reason in blocks(f):
            assert lang in ("python", "bash", "text", "yaml", "json"), (f.name, lang)
            assert reason is None or len(reason) > 5, (f.name, "a not-run marker needs its reason")


RUNNABLE = [(f, i) for f in GUIDES for i, (lang, _, reason) in enumerate(blocks(f))
            if lang in ("python", "bash") and reason is None]


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted({f for f, _ in RUNNABLE}), ids=lambda p: p.name)
def test_guide_examples_run(page: Path, tmp_path: Path):
    env = {**os.environ, "WANDB_MODE": "offline", "JAX_PLATFORMS": "cpu", "PYTHONPATH":
           os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # The guides' `corpus.txt` / `new.txt`: any UTF-8 text; here slices of the installed corpus.
    from .conftest import plays_slice, poems_text

    plays_slice(tmp_path / "corpus.txt", 200_000)
    (tmp_path / "new.txt").write_text(poems_text()[:50_000])
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    for i, (lang, code, reason) in enumerate(blocks(page)):
        if reason is not None or lang not in ("python", "bash"):
            continue
        cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{page.name} block {i} ({lang}) failed:\n{code}\n--- stderr:\n{r.stderr[-3000:]}"
