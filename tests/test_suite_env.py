"""The suite's own environment (tests/conftest.py, tests/procs.py): children inherit its XLA
compile options, so a subprocess's programs are compiled as the test process's are (the bitwise
CLI-vs-in-process checks rely on it), with only the simulated device count replaced."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import TEST_XLA_FLAGS
from .procs import device_env, xla_flags


def test_children_keep_the_suites_xla_flags_with_their_own_device_count(monkeypatch):
    if os.environ.get("DANTINOX_EQX_TEST_XLA_DEFAULTS") == "1":
        assert not set(TEST_XLA_FLAGS) & set(os.environ.get("XLA_FLAGS", "").split())
        return
    assert set(TEST_XLA_FLAGS) <= set(os.environ["XLA_FLAGS"].split())
    monkeypatch.setenv("XLA_FLAGS", f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=8")
    flags = xla_flags(3).split()
    assert flags.count("--xla_force_host_platform_device_count=3") == 1
    assert not any(f.endswith("count=8") for f in flags) and set(TEST_XLA_FLAGS) <= set(flags)
    probe = "import os, jax; print(len(jax.devices()), os.environ['XLA_FLAGS'])"
    out = subprocess.run([sys.executable, "-c", probe], env=device_env(3), capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out[0] == "3" and set(TEST_XLA_FLAGS) <= set(out[1:])
