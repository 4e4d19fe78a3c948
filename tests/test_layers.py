"""The package's imports run one way, from low layers to high (docs/guides/architecture.md).

Every module's imports are parsed (`ast`, deferred ones inside functions included) and checked
against `LAYERS`: a module may import its own layer (without a cycle) and the layers below it,
never a layer above. A cycle anywhere fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "dantinox_eqx"

# Lowest first. A module is named by its path in the package; a folder stands for all its modules.
LAYERS: list[tuple[str, ...]] = [
    ("files", "hostmem", "compile_cache"),
    ("config",),
    ("parallel",),
    ("nn",),
    ("model",),
    ("lora",),
    ("data",),
    ("run",),  # a run directory holds a tokenizer: run/ reads data/, never the reverse
    ("train",),
    ("infer",),
    ("tools",),
    ("__init__",),  # the front door may import anything (lazily)
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    first = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if first in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def _imports(path: Path) -> set[str]:
    """The package modules `path` imports (relative or absolute), wherever the import stands."""
    me = _module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("dantinox_eqx"):
                target = node.module.split(".")[1:]
            else:
                continue
            names = [a.name for a in node.names]
            for name in names:  # `from . import checkpoint` imports a module
                candidate = [*target, name]
                if (PKG.joinpath(*candidate).with_suffix(".py")).is_file() or PKG.joinpath(*candidate).is_dir():
                    out.add(".".join(candidate))
                elif target:
                    out.add(".".join(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dantinox_eqx."):
                    out.add(alias.name.split(".", 1)[1])
    return {m for m in out if m}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def test_every_import_points_down_or_sideways():
    graph = _graph()
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in graph.items() for t in targets if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    # A package's __init__ importing its own modules is not a cycle back to itself.
    edges = {m: {t for t in ts if not m.startswith(t + ".") and t != m} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself: a layer-3 module importing the trainer is caught."""
    fake = tmp_path / "dantinox_eqx"
    (fake / "nn").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "train" / "trainer.py").write_text("")
    (fake / "nn" / "bad.py").write_text("def f():\n    from ..train.trainer import Trainer\n")
    globals()["PKG"], saved = fake, PKG
    try:
        assert _imports(fake / "nn" / "bad.py") == {"train.trainer"}
        with pytest.raises(AssertionError, match="nn.bad"):
            test_every_import_points_down_or_sideways()
    finally:
        globals()["PKG"] = saved


def test_no_source_file_is_long():
    """About 400 lines at most (460 allowed). config.py is the one exception: the flat table of every config
    field (the seed's names, one commented line each) is one concept and reads best whole."""
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 460 and p.name != "config.py"}
    assert not long, long
