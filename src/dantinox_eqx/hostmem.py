"""Host memory: let XLA:CPU reuse its per-step buffers instead of faulting in fresh pages.

XLA:CPU allocates an executable's temporaries with malloc on every call (tens of MB for the baby
training step). glibc serves requests above its mmap threshold (dynamic, at most 32 MiB) with a
fresh `mmap` and returns them to the kernel on free, so every step faults in and zeroes tens of
thousands of pages again. Measured on the 2-core CPU, baby shape: 20 % of the process's CPU time
in the kernel and ~12 ms of a 50 ms step. Raising the mmap and trim thresholds keeps freed memory
in the heap, where the next step finds it: 50 -> 37 ms/step, kernel time 3.0 -> 0.8 s per 100
steps.

At a real model's size two more things are needed (SmolLM2-135M, LoRA step, batch 2 x 256: the
step's temporaries are ONE 1.19 GB block): the threshold goes to mallopt's largest (an int,
2 GiB - 1), and the process keeps a single malloc arena. XLA runs the step on its own threads,
and glibc serves a thread from a secondary arena whose heaps are at most 64 MiB: anything larger
is mmap'd and unmapped on free whatever the threshold. With one arena every thread allocates from
the main heap, which grows to the peak once. Measured: 320k page faults (1.3 GB) and ~0.7 s of
kernel time per LoRA step before, none after the heap has grown (second step on). The arena
limit only binds threads that have not malloc'd yet, so call this before JAX starts (the CLI
does it first thing).

Trimming is off altogether (M_TRIM_THRESHOLD -1): with the largest int threshold glibc still
gave the heap's top back whenever more than 2 GiB of it was free, which two such programs in one
process reach at every switch (SmolLM2's LoRA and full steps alternating: 8 of 12 steps faulted
in 1.1-1.2 GB again; without trimming 2 of 12, the first and one later; the same happened in
`benchmarks/smollm2.py`, where our LoRA step faulted its 1.2 GB in 7 of 9 rounds).

This changes a process-wide setting, so the library never does it on import: the CLI, the
Trainer and the benchmarks call `keep_freed_memory()`; research code may call it too. The price
is that the process keeps its peak heap size (it does not give freed memory back to the OS).

Huge pages (`huge_pages_environ`): with 4 KiB pages the step's GEMMs and elementwise passes over
a 1.2 GB heap miss the TLB; glibc (2.35+) backs its heap with 2 MiB transparent huge pages when
the environment says `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, which it reads only at start-up.
So the CLI runs itself again under it (`cli/main.py`); a script of your own can be started with
it. Measured (SmolLM2-135M, float32, batch 2 x 256, AVX2 EPYC, side by side with PyTorch in one
process, both under the setting): our LoRA step 3095 -> 2777 ms, full 3935 -> 3690 ms; PyTorch's
3252 -> 3033 and 3992 -> 3905 (issue 25, benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["keep_freed_memory", "huge_pages_environ", "restart_with_huge_pages", "HUGE_PAGES_TUNABLE"]

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
LARGEST = 2**31 - 1  # mallopt takes an int
NEVER_TRIM = -1  # M_TRIM_THRESHOLD -1: "disables trimming completely" (mallopt(3))


@functools.cache
def keep_freed_memory(threshold_bytes: int = LARGEST) -> bool:
    """Serve allocations below `threshold_bytes` from the malloc heap and keep all freed memory
    there (no trimming), from one arena for every thread (module docstring). Returns True when
    applied, False where there is no glibc `mallopt` (macOS, musl): a no-op there, as those
    allocators do not unmap per free in the same way.
    Idempotent (cached)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (bool(mallopt(_M_ARENA_MAX, 1)) and bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
            and bool(mallopt(_M_TRIM_THRESHOLD, NEVER_TRIM)))


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"  # =1: madvise(MADV_HUGEPAGE) on malloc's heap (glibc >= 2.35)
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` plus `GLIBC_TUNABLES=...:glibc.malloc.hugetlb=1`: the environment to start this
    program again in so that malloc's heap gets transparent huge pages (module docstring). None
    when there is nothing to do: not Linux with glibc 2.35 or newer, transparent huge pages off
    ("never"), or the tunable already given (any value: `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`
    is how to opt out). Under "always" it still pays: glibc then aligns the heap's growth to the
    huge page size."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(t.split("=", 1)[0] == HUGE_PAGES_TUNABLE for t in tunables.split(":")):
        return None
    libc, version = platform.libc_ver()
    if not sys.platform.startswith("linux") or libc != "glibc" or _version(version) < (2, 35):
        return None
    try:
        mode = _THP_MODE.read_text()
    except OSError:
        return None
    if "[never]" in mode:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{HUGE_PAGES_TUNABLE}=1"]))}


def restart_with_huge_pages(argv: Sequence[str]) -> None:
    """Replace this process by the interpreter running `argv` (its own arguments, e.g.
    `sys.orig_argv`) under `huge_pages_environ(os.environ)`; return at once where that has
    nothing to do (which includes the restarted process: it finds the tunable set)."""
    environ = huge_pages_environ(os.environ)
    if environ is not None:
        sys.stdout.flush(), sys.stderr.flush()
        os.execve(sys.executable, list(argv), environ)


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(".")[:2])
    except ValueError:
        return ()
