"""How a training process on the CPU gets its memory back from the C allocator.

Every step allocates and frees the same large tensors: activations, and the word embeddings'
dense gradient (30,522 x 384 floats, 47 MB for MiniLM), which ``zero_grad(set_to_none=True)``
frees and the next backward allocates again. glibc's malloc serves a block of 32 MB or more
(less, depending on its history) with ``mmap``. On ``free`` it returns those pages to the
system, and trims the top of the heap back too. The next step then touches fresh pages: the
kernel zero-fills each 4 KB page on its first write (a page fault), and only after that does
PyTorch zero the gradient a second time. On a 2-core CPU that cost 4-13% of a MiniLM step
(benchmarks/RESULTS.md).

``keep_freed_memory()`` asks glibc (``mallopt``) to stop doing that for this process: no
``mmap`` for large blocks (they come from the heap and are reused) and no trimming of the
heap. The process then keeps its peak footprint until it exits, which a training run reaches
anyway after its first step. PyTorch's CPU tuning guide gets the same effect by preloading
another allocator (jemalloc, tcmalloc). ``minift finetune`` and ``minift pretrain`` call it on the
CPU; ``MINIFT_MALLOC=system`` leaves the allocator as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> str:
    """Tell glibc to keep freed memory for reuse (see the module's doc). Returns what was done, in
    words; does nothing where the C library is not glibc, or with MINIFT_MALLOC=system."""
    if os.environ.get("MINIFT_MALLOC", "").lower() == "system":
        return "the C allocator as it is (MINIFT_MALLOC=system)"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version                      # glibc only: musl and others have no such tuning
    except (OSError, AttributeError, TypeError):
        return "the C allocator as it is (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) != 1:
        return "the C allocator as it is (mallopt refused)"
    return "freed memory kept for reuse (glibc: no mmap, no trim; MINIFT_MALLOC=system turns this off)"
