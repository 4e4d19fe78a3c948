"""hostmem.keep_freed_memory: freed heap memory stays mapped, so a program's next call finds its
temporaries in pages it already touched (no page faults), even when more than the threshold of
the heap's top is free (the case that re-faulted SmolLM2's 1.2 GB LoRA temporaries)."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dantinox_eqx import hostmem
from dantinox_eqx.hostmem import huge_pages_environ

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


_THP = hostmem._THP_MODE.read_text() if hostmem._THP_MODE.exists() else ""
needs_huge_pages = pytest.mark.skipif(huge_pages_environ({}) is None,
                                      reason="Linux, glibc >= 2.35, transparent huge pages not off")

# A fresh process mallocs 48 MiB (above glibc's default mmap threshold) and touches it: the
# minor page faults of the touch are printed (one per 4 KiB page without huge pages).
_TOUCH = r"""
import ctypes, ctypes.util, resource
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
size = 48 << 20
a = libc.malloc(size)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(a, 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@needs_huge_pages
def test_huge_pages_environ_adds_the_tunable_once_and_respects_a_given_one(monkeypatch, tmp_path):
    mode = tmp_path / "enabled"
    monkeypatch.setattr(hostmem, "_THP_MODE", mode)
    mode.write_text("always [madvise] never\n")
    assert huge_pages_environ({"HOME": "/h"}) == {"HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    off = "glibc.malloc.hugetlb=0"
    for given in ("glibc.malloc.hugetlb=1", off, f"glibc.malloc.arena_max=2:{off}"):
        assert huge_pages_environ({"GLIBC_TUNABLES": given}) is None  # the user's choice stands
    mode.write_text("always madvise [never]\n")
    assert huge_pages_environ({}) is None  # huge pages off on this machine: nothing to gain
    mode.write_text("[always] madvise never\n")
    assert huge_pages_environ({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    monkeypatch.setattr(hostmem, "_THP_MODE", tmp_path / "missing")
    assert huge_pages_environ({}) is None


@needs_huge_pages
def test_under_the_tunable_malloc_memory_faults_in_whole_huge_pages():
    def faults(environ: dict[str, str]) -> int:
        out = subprocess.run([sys.executable, "-c", _TOUCH], env=environ, capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    pages = (48 << 20) // 4096
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    # 2 MiB per fault inside the block, 4 KiB pages only at its unaligned ends: ~535 instead of 12288
    assert faults(huge_pages_environ(plain)) < pages // 10
    if "[madvise]" in _THP:  # ("always" gives huge pages without the tunable too)
        assert faults(plain) > pages // 2


@needs_huge_pages
def test_the_cli_starts_itself_again_under_the_tunable(tmp_path):
    """The installed command runs twice, the second time with the tunable; told not to (a given
    tunable), once. A sitecustomize on PYTHONPATH records each interpreter start's GLIBC_TUNABLES."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import os\nwith open(os.environ['STARTS_FILE'], 'a') as f:\n"
        "    f.write(os.environ.get('GLIBC_TUNABLES', '-') + '\\n')\n")
    exe = Path(sys.executable).parent / "dantinox-eqx"
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    off = "glibc.malloc.hugetlb=0"
    for name, extra, expected in [("restart", {}, ["-", "glibc.malloc.hugetlb=1"]),
                                  ("opted_out", {"GLIBC_TUNABLES": off}, [off])]:
        starts = tmp_path / f"{name}.txt"
        env = {**plain, **extra, "PYTHONPATH": str(tmp_path / "site"), "STARTS_FILE": str(starts)}
        out = subprocess.run([str(exe), "--version"], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.count("version") == 1  # printed once: by the restarted process only
        assert starts.read_text().splitlines() == expected
