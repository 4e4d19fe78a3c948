"""Launching test subprocesses on simulated CPU devices (the device count is fixed at JAX start,
so multi-device cases run in child processes)."""

from __future__ import annotations

import os
import socket
import sys

from dantinox_eqx.parallel import distributed


def device_env(devices: int, **extra: str) -> dict[str, str]:
    """This process's environment for a child that sees `devices` CPU devices: no inherited
    multi-process settings, our import path, W&B offline; `extra` added last."""
    env = dict(os.environ)
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        env.pop(name, None)
    env.update(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(sys.path), WANDB_MODE="offline", WANDB_SILENT="true", **extra)
    return env


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a child with `devices` simulated CPU devices: this process's flags (the
    suite's compile options, tests/conftest.py) with the device count replaced."""
    count = "--xla_force_host_platform_device_count"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=")[0] != count]
    return " ".join(kept + [f"{count}={devices}"])


def free_port() -> int:
    """A localhost TCP port nobody listens on (for jax.distributed's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line_refusals(cli, cases) -> None:
    """Each case (args, named, target): `cli(*args)` exits 2 with one stderr line, "Error: ..."
    naming `named`, and leaves `target` (a path, or None) not created."""
    for args, named, target in cases:
        res = cli(*args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error:"), (args, res.stderr)
        assert named in lines[0], (named, lines[0])
        assert target is None or not target.exists()
