"""`nox -s typecheck` imports every module of the package under jaxtyping + beartype."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_typecheck_session_imports_every_module_under_the_shape_checker():
    """The session's script (noxfile.IMPORT_EVERY_MODULE, read with `ast`: nox need not be
    installed) reaches every module file, subpackages' included: one module per .py file but the
    top-level __init__ (the package it starts from)."""
    tree = ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8"))
    script = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], "id", None) == "IMPORT_EVERY_MODULE")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    files = list((ROOT / "src" / "dantinox_eqx").rglob("*.py"))
    imported = int(re.fullmatch(r"all (\d+) modules import with shape checking on\n", out.stdout)[1])
    assert imported == len(files) - 1 > 60
