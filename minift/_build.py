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


# The headers that every kernel file includes and that take most of its compile time (about 25 of
# the 30-60 s a file takes): compiled once into a precompiled header, which each file's compile then
# loads (`-include`). GCC and Clang check that a precompiled header was built with compatible
# options and otherwise read the text header instead: a mismatch costs time, never correctness.
PCH_HEADERS = ("ATen/ATen.h", "ATen/Parallel.h", "torch/library.h")


def torch_cxx_std() -> str:
    """The C++ standard that torch.utils.cpp_extension compiles extensions with (c++20 in recent
    torch, c++17 before): a precompiled header must be built with the same."""
    import inspect

    from torch.utils import cpp_extension
    return "-std=c++20" if "'-std=c++20'" in inspect.getsource(cpp_extension) else "-std=c++17"


def precompiled_header(cxx: str, flags: list[str], directory: str) -> list[str]:
    """Builds ``directory/minift_pch.h`` and its ``.gch`` with ``cxx`` and ``flags`` (the flags the
    kernel files are compiled with, less include paths: torch's and Python's are added here) unless
    an up-to-date one is there; returns the flags that make a compile use it, or [] where it cannot
    be built (not GCC or Clang, MINIFT_NO_PCH=1, a failure)."""
    import hashlib
    import subprocess
    import sysconfig

    from torch.utils.cpp_extension import include_paths
    if os.name == "nt" or os.environ.get("MINIFT_NO_PCH", "0") == "1":
        return []
    os.makedirs(directory, exist_ok=True)
    header = os.path.join(directory, "minift_pch.h")
    text = "#pragma once\n" + "".join(f"#include <{h}>\n" for h in PCH_HEADERS)
    includes = [f"-I{d}" for d in [*include_paths(), sysconfig.get_paths()["include"]]]
    cmd = [cxx, *flags, *includes, "-x", "c++-header", header, "-o", header + ".gch"]
    stamp = hashlib.sha256(("\0".join(cmd) + text).encode()).hexdigest()
    use = ["-include", header, "-Winvalid-pch"]
    try:
        with open(header + ".stamp", encoding="utf-8") as f:
            if f.read() == stamp and os.path.isfile(header + ".gch"):
                return use
    except OSError:
        pass
    with open(header, "w", encoding="utf-8") as f:
        f.write(text)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not os.path.isfile(header + ".gch"):
        print(f"minift: no precompiled header ({first_error_line(r.stdout + r.stderr)}); "
              "the kernels compile without it, more slowly")
        return []
    with open(header + ".stamp", "w", encoding="utf-8") as f:
        f.write(stamp)
    return use
