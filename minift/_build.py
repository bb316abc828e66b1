"""Compiler flags shared by the ahead-of-time build (setup.py) and the just-in-time one (ops.py)."""
from __future__ import annotations

import os
import platform
import re


def cpu_flags() -> list[str]:
    """Flags that let the CPU kernels' at::vec::Vectorized use AVX2 registers.

    Added only when the building machine is x86-64 with AVX2, FMA and F16C (the extension is built where
    it runs); elsewhere, or with MINIFT_PORTABLE=1, Vectorized falls back to plain loops.
    """
    if os.environ.get("MINIFT_PORTABLE", "0") == "1" or os.name == "nt":
        return []
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            words = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return []
    if {"avx2", "fma", "f16c"} <= words:           # what ATen's AVX2 code paths are built with
        # -ffp-contract=off: a * b + c stays two roundings, as in PyTorch's own kernels, so the
        # fused AdamW matches the Python loop bit for bit instead of drifting by an ulp per step
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-ffp-contract=off"]
    return []


def first_error_line(log: str) -> str:
    """The first line of a compiler log that reports an error (what a user needs to see first)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\berror\b", line, re.IGNORECASE) and not line.startswith(("FAILED:", "ninja: build stopped")):
            return line[:300]
    return lines[-1][:300] if lines else "no compiler output"
