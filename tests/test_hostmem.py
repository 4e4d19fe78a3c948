"""hostmem.keep_freed_memory: freed heap memory stays mapped, so a program's next call finds its
temporaries in pages it already touched (no page faults), even when more than the threshold of
the heap's top is free (the case that re-faulted SmolLM2's 1.2 GB LoRA temporaries)."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

# In a fresh process (the setting is process-wide): two 48 MiB blocks, touched and freed, leave
# 96 MiB free at the heap's top, over the 64 MiB mmap threshold; then a 48 MiB block again,
# touched: the minor page faults of that second touch are printed.
_PROBE = r"""
import ctypes, ctypes.util, resource, sys
if sys.argv[1] == "keep":
    from dantinox_eqx.hostmem import keep_freed_memory
    assert keep_freed_memory(64 << 20)
else:  # the earlier setting: the trim threshold equal to the mmap threshold
    from dantinox_eqx.hostmem import _M_ARENA_MAX, _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    assert (libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
            and libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20))
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 48 << 20
a, b = libc.malloc(size), libc.malloc(size)
ctypes.memset(a, 1, size); ctypes.memset(b, 1, size)
libc.free(b); libc.free(a)
c = libc.malloc(size)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(c, 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"),
                    reason="glibc's mallopt")
def test_freed_heap_top_is_kept_not_trimmed():
    pages = (48 << 20) // 4096
    assert _faults("trim_at_threshold") > pages // 2  # given back to the kernel: faulted in again
    assert _faults("keep") < pages // 100  # kept: the same pages, already touched
