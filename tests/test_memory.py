"""minift.memory: a training process on the CPU keeps freed memory for reuse. Measured by what it
is for: once the heap has grown to its working size, allocating, filling and freeing a 64 MB tensor
again and again should cost no page faults (glibc's default returns the pages on each free, and
each refill faults every 4 KB page in again)."""
import os
import subprocess
import sys

import pytest

from minift import memory

PROBE = r"""
import resource, sys, torch
from minift import memory
if sys.argv[1] == "keep":
    print(memory.keep_freed_memory(), file=sys.stderr)
for _ in range(8):                     # warm-up: the heap grows to its working size
    x = torch.ones(16 * 2 ** 20)       # 64 MB: glibc's default serves it with mmap
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):                     # a training step's pattern: allocate, fill, free
    x = torch.ones(16 * 2 ** 20)
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, env=None) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return int(out.stdout.split()[-1])


glibc = "glibc" in (os.confstr("CS_GNU_LIBC_VERSION") or "")


@pytest.mark.skipif(not glibc, reason="the tuning is glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    pages = 3 * 16 * 2 ** 20 * 4 // 4096                        # what three refills fault in by default
    default, kept = faults("default"), faults("keep")
    assert default > pages // 2, f"the default allocator faulted {default} pages: the probe measures nothing"
    assert kept < pages // 20, f"with the memory kept: {kept} page faults for {pages} pages refilled"


@pytest.mark.skipif(not glibc, reason="the tuning is glibc's mallopt")
def test_minift_malloc_system_leaves_the_allocator_alone():
    assert faults("keep", {"MINIFT_MALLOC": "system"}) > 3 * 16 * 2 ** 20 * 4 // 4096 // 2
    os.environ["MINIFT_MALLOC"] = "system"
    try:
        assert "MINIFT_MALLOC=system" in memory.keep_freed_memory()
    finally:
        del os.environ["MINIFT_MALLOC"]
