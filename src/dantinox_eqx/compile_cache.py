"""JAX's persistent compilation cache, on by default for the CLI (issue 16: seconds to the first
step). XLA compilation is most of the time to a run's first step (a 2-block, dim-64 model: 11.6
of 19 s); with the cache, a later run of the same shapes loads its programs from disk instead.

Where the cache lives (first match wins):

1. `JAX_COMPILATION_CACHE_DIR` is set: JAX's own setting is respected, nothing is changed;
2. `DANTINOX_EQX_COMPILE_CACHE` is `0` / `off` / `false` / `no`, or the CLI got
   `--no-compile-cache`: no cache;
3. `DANTINOX_EQX_COMPILE_CACHE=PATH`: that folder;
4. otherwise `files.cache_dir() / "jax-cache"` (~/.cache/dantinox-eqx/jax-cache).

Every program is cached, however short its compile (JAX's default keeps only those over 1 s,
and a run's dozens of small programs add up); `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`
overrides that. Call `enable_compile_cache` before JAX compiles anything: it sets the
environment variables JAX reads when it is imported, or JAX's config when JAX is already
imported, so the CLI's `--help` never imports JAX.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .files import cache_dir

__all__ = ["ENV", "compile_cache_dir", "enable_compile_cache"]

ENV = "DANTINOX_EQX_COMPILE_CACHE"
_JAX_DIR = "JAX_COMPILATION_CACHE_DIR"
_JAX_MIN_TIME = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
_OFF = ("0", "off", "false", "no")


def compile_cache_dir(enabled: bool = True) -> Path | None:
    """The folder the cache should use (module docstring), or None when it stays off or is
    JAX's own (JAX_COMPILATION_CACHE_DIR set)."""
    if os.environ.get(_JAX_DIR):
        return None
    value = os.environ.get(ENV, "").strip()
    if not enabled or value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    return cache_dir() / "jax-cache"


def enable_compile_cache(enabled: bool = True) -> Path | None:
    """Turn the persistent cache on in `compile_cache_dir(enabled)`; returns that folder (None:
    nothing changed). JAX creates the folder on its first write."""
    path = compile_cache_dir(enabled)
    if path is None:
        return None
    min_time = os.environ.get(_JAX_MIN_TIME, "0")
    if "jax" in sys.modules:  # too late for the environment: JAX read it at import
        import jax  # noqa: PLC0415

        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_time))
    else:
        os.environ[_JAX_DIR] = str(path)
        os.environ[_JAX_MIN_TIME] = min_time
    return path
