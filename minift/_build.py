"""Compiler flags shared by the ahead-of-time build (setup.py) and the just-in-time one (ops.py)."""
from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import subprocess


# What ATen's own AVX512 and AVX2 kernels are compiled with (its CPU_CAPABILITY builds): the
# instruction sets, and the macro at::vec::Vectorized reads to pick 16- or 8-float registers.
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
# the /proc/cpuinfo flags each build needs, to compile for and to run
CPU_NEEDS = {"AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
             "AVX2": {"avx2", "fma", "f16c"}}


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """Flags that let the CPU kernels' at::vec::Vectorized use the widest registers this machine
    has: AVX-512 (16 floats) where it has AVX512F/BW/VL/DQ, else AVX2 (8 floats) where it has
    AVX2, FMA and F16C.

    Added only when the building machine is x86-64 (the extension is built where it runs);
    elsewhere, or with MINIFT_PORTABLE=1, Vectorized falls back to plain loops. MINIFT_SIMD=avx2
    keeps AVX2 on an AVX-512 machine (a module to copy to AVX2-only machines of the same kind).
    """
    if os.environ.get("MINIFT_PORTABLE", "0") == "1" or os.name == "nt":
        return []
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    words = _cpu_words(cpuinfo)
    if words is None:
        return []
    # -ffp-contract=off: a * b + c stays two roundings, as in PyTorch's own kernels, so the fused
    # AdamW matches the Python loop bit for bit instead of drifting by an ulp per step
    contract = ["-ffp-contract=off"]
    wanted = os.environ.get("MINIFT_SIMD", "").lower()
    if wanted not in ("", "avx512", "avx2"):
        raise ValueError(f"MINIFT_SIMD: expected avx512 or avx2 (or unset: the widest this CPU has), got {wanted!r}")
    avx512, avx2 = CPU_NEEDS["AVX512"] <= words, CPU_NEEDS["AVX2"] <= words
    if wanted == "avx512" and not avx512:
        raise ValueError(f"MINIFT_SIMD=avx512: this CPU lacks AVX512F/BW/VL/DQ (see {cpuinfo}); "
                         "unset it to build for the widest it has")
    if avx512 and wanted in ("", "avx512"):
        return AVX512_FLAGS + contract
    if avx2:
        return AVX2_FLAGS + contract
    return []


def _cpu_words(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (None where it cannot be read)."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return None


def simd_of(flags: list[str]) -> str:
    """The vector width a list of cpu_flags builds for: "AVX512", "AVX2" or "none"."""
    return ("AVX512" if "-DCPU_CAPABILITY_AVX512" in flags else
            "AVX2" if "-DCPU_CAPABILITY_AVX2" in flags else "none")


def cpu_runs(simd: str, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has what a module built for ``simd`` (simd_of) executes. A module built on
    an AVX-512 machine and copied to an AVX2 one would stop at its first AVX-512 instruction
    (SIGILL) instead of raising; True where that cannot be told (no /proc/cpuinfo)."""
    words = _cpu_words(cpuinfo)
    if simd == "none" or words is None:
        return True
    return CPU_NEEDS.get(simd, set()) <= words


def links_shared_libstdcxx(cxx: str) -> bool | None:
    """Whether the compiler ``cxx`` would link the C++ runtime as the shared libstdc++.so (None where
    that cannot be told: not on Linux, the compiler does not run, or it does not answer the query).

    A toolchain that has only libstdc++.a (seen with a GCC installed under /opt, named by CXX) links a
    private copy of the runtime into minift._C. torch uses the system's shared one, and the two
    copies' streams and locales are not the same objects: the module then crashes (a segmentation
    fault) the first time it formats an error message, for instance on a wrong tensor shape."""
    if platform.system() != "Linux":
        return None
    try:
        argv = shlex.split(cxx)            # CXX may carry a wrapper or options: "ccache g++", "g++ -m64"
        r = subprocess.run([*argv, "-print-file-name=libstdc++.so"], capture_output=True, text=True, timeout=60)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    answer = r.stdout.strip()
    if r.returncode != 0 or not answer:
        return None
    return os.path.isabs(answer)      # found: its path; not found: the bare name comes back


def compiler_of(cxx: str) -> str:
    """The compiler a CXX value names: its first word, or the second after a wrapper such as ccache."""
    words = shlex.split(cxx) or [cxx]
    if len(words) > 1 and os.path.basename(words[0]) in ("ccache", "sccache", "distcc", "icecc"):
        return words[1]
    return words[0]


def choose_cxx() -> str | None:
    """Makes sure the build links libstdc++ as a shared library. If $CXX (default c++) would link it
    statically, the first of c++ and g++ on PATH that links it shared becomes $CXX for this process
    (torch's build reads $CXX), and a sentence saying so is returned; if none does, RuntimeError.
    None when nothing had to change."""
    cxx = os.environ.get("CXX", "c++")
    if links_shared_libstdcxx(cxx) is not False:
        return None
    named = shutil.which(compiler_of(cxx)) or cxx
    for other in ("c++", "g++"):
        path = shutil.which(other)
        if path and os.path.realpath(path) != os.path.realpath(named) and links_shared_libstdcxx(path):
            os.environ["CXX"] = path
            return (f"minift: the C++ compiler CXX={cxx} finds no shared libstdc++.so (only the static "
                    f"library), and a module linked with it crashes when torch's and its own C++ runtimes "
                    f"meet; building with {path} instead (set CXX to a compiler that has libstdc++.so to "
                    f"choose another)")
    raise RuntimeError(
        f"minift: the C++ compiler CXX={cxx} finds no shared libstdc++.so (`{cxx} "
        f"-print-file-name=libstdc++.so` names no file), and no c++ or g++ on PATH does. A module "
        f"linked with the static library crashes when torch's and its own C++ runtimes meet. Set CXX to "
        f"a compiler with libstdc++.so (on Debian/Ubuntu: apt install g++).")


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
    # The command alone does not name the headers' contents: torch upgraded in place keeps its
    # include paths, and GCC would load a precompiled header of the old torch without a word. So the
    # stamp also covers torch's version and each precompiled header's size and time as found.
    import torch
    found = [os.path.join(d, h) for h in PCH_HEADERS for d in include_paths() if os.path.isfile(os.path.join(d, h))]
    files = [f"{f}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in found]
    stamp = hashlib.sha256("\0".join([*cmd, text, torch.__version__, str(torch.version.git_version), *files])
                           .encode()).hexdigest()
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
