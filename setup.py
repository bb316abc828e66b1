"""Builds minift's compiled extension minift._C; the package's metadata is in pyproject.toml.

CPU kernels (csrc/*.cpp) are always compiled. CUDA kernels (csrc/cuda/) are added when the installed
torch has CUDA and nvcc is found; if they fail to compile, the CPU-only extension is built instead,
one paragraph says why, and `minift doctor` reports it. DEBUG=1 builds with -O0 -g; MINIFT_NO_CUDA=1
skips CUDA; MINIFT_PORTABLE=1 leaves out the AVX2 flags (minift/_build.py). The C++ files compile
against a precompiled header of torch's headers (about 400 MB, in the build folder), which halves the
compile time; MINIFT_NO_PCH=1 goes without it.
Install with:  pip install --no-build-isolation -e .   (or `.` for a regular install)
"""
import glob
import importlib.util
import json
import os
import shutil
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("minift compiles its kernels against the PyTorch installed in your environment, and this build "
             "environment has none. Install torch first (pip install torch==2.13.0 for the CPU build), then "
             "install minift without build isolation:  pip install --no-build-isolation -e .")

_spec = importlib.util.spec_from_file_location("minift_build", os.path.join("minift", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

try:
    _note = _build.choose_cxx()       # a C++ compiler that links libstdc++ as a shared library
except RuntimeError as e:
    if not {"sdist", "egg_info", "dist_info"} & set(sys.argv):   # those compile nothing
        sys.exit(str(e))
    _note = None
if _note:
    print(_note, file=sys.stderr, flush=True)

DEBUG = os.environ.get("DEBUG", "0") == "1"
CPU_SOURCES = sorted(glob.glob("csrc/*.cpp"))
CUDA_SOURCES = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))


def cuda_skip_reason() -> str | None:
    """None when the CUDA kernels should be built, else why not."""
    if os.environ.get("MINIFT_NO_CUDA", "0") == "1":
        return "MINIFT_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    if CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME)"
    return None


def make_extension(with_cuda: bool):
    # -g0: no debug information (Python's own build flags ask for -g), which makes the compile of
    # these template-heavy files about 2.5x faster and the module several times smaller.
    cxx = (["-O0", "-g"] if DEBUG else ["-O3", "-g0"]) + (["-fopenmp"] if os.name != "nt" else []) + _build.cpu_flags()
    args = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"] if os.name != "nt" else [])
    if not with_cuda:
        return CppExtension("minift._C", CPU_SOURCES, **args)
    args["extra_compile_args"]["nvcc"] = ["-O0", "-g", "-G"] if DEBUG else ["-O3", "--use_fast_math", "-lineinfo"]
    # the CUDA sources first: ninja starts them first, so a CUDA build that is going to fail fails in
    # its first seconds, before the C++ files are compiled (they are compiled again without CUDA)
    return CUDAExtension("minift._C", CUDA_SOURCES + CPU_SOURCES, define_macros=[("MINIFT_WITH_CUDA", None)], **args)


class BuildWithCPUFallback(BuildExtension):
    """torch's BuildExtension, plus: a CUDA build that fails is followed by a CPU-only one, and what
    happened is written beside the module as _build_info.json for `minift doctor`."""

    def build_extensions(self):
        skip = cuda_skip_reason()
        if skip is not None:
            super().build_extensions()
            return self._record({"cuda": "skipped", "detail": skip})
        try:
            self._build_capturing_output()
            return self._record({"cuda": "built", "detail": "built"})
        except Exception as e:  # any compile or link failure of the CUDA build
            first = _build.first_error_line(getattr(e, "captured", "") + "\n" + str(e))
        print(f"\nminift: the CUDA kernels did not compile, so minift is being built with its CPU kernels "
              f"only (they are complete: every op runs on the CPU, and on the GPU through plain PyTorch).\n"
              f"  first error: {first}\n"
              f"  to see the whole log: DEBUG=1 pip install -v --no-build-isolation -e .\n"
              f"  to skip the CUDA attempt next time: MINIFT_NO_CUDA=1 pip install --no-build-isolation -e .\n",
              file=sys.stderr, flush=True)
        cpu = make_extension(with_cuda=False)
        for ext in self.extensions:
            for attr in ("sources", "include_dirs", "library_dirs", "libraries", "define_macros",
                         "extra_compile_args", "extra_link_args", "runtime_library_dirs", "language"):
                setattr(ext, attr, getattr(cpu, attr))
        super().build_extensions()
        self._record({"cuda": "failed", "detail": f"the CUDA build failed ({first})"})

    def build_extension(self, ext):
        """Each extension's C++ files compile against a precompiled header of the torch headers they
        all include (minift/_build.py), built first with their own flags: about half the CPU time."""
        from torch.utils.cpp_extension import get_cxx_compiler
        args = ext.extra_compile_args
        cxx_args = args["cxx"] if isinstance(args, dict) else args
        if not any(a.startswith("-std=") for a in cxx_args):
            # the standard torch would append at compile time, given here so that the precompiled
            # header is built with it too
            cxx_args.append(_build.torch_cxx_std())
        # none of the extension's own macros or include paths (torch's headers do not read them): the
        # CUDA attempt and a CPU-only rebuild after it share one precompiled header
        cxx_args += _build.precompiled_header(get_cxx_compiler(), [*self.compiler.compiler_so[1:], *cxx_args],
                                              os.path.join(os.path.abspath(self.build_temp), "pch"))
        super().build_extension(ext)

    def _build_capturing_output(self):
        """super().build_extensions() with the compiler output (ninja writes to fd 1) also kept, to
        quote the first error line; the output still reaches the terminal."""
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1)
        with tempfile.TemporaryFile(mode="w+b") as tmp:
            os.dup2(tmp.fileno(), 1)
            try:
                super().build_extensions()
            except Exception as e:
                e.captured = self._restore(saved, tmp)
                raise
            return self._restore(saved, tmp)

    @staticmethod
    def _restore(saved_fd, tmp) -> str:
        sys.stdout.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
        tmp.seek(0)
        data = tmp.read()
        os.write(1, data)
        return data.decode("utf-8", "replace")

    def _record(self, info):
        """_build_info.json beside the compiled module (and its in-place copy)."""
        for ext in self.extensions:
            path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_build_info.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                json.dump({**info, "simd": _build.simd_of(_build.cpu_flags())}, f)   # checked at import

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        build_py_cmd = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py_cmd, ext)
            info = os.path.join(os.path.dirname(regular_file), "_build_info.json")
            if os.path.exists(info):
                shutil.copyfile(info, os.path.join(os.path.dirname(inplace_file), "_build_info.json"))


class BuildPyWithSources(build_py):
    """A regular (non-editable) build also ships csrc/ as minift/_csrc, so that the just-in-time
    build of an installed wheel finds its sources."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            shutil.copytree("csrc", os.path.join(self.build_lib, "minift", "_csrc"), dirs_exist_ok=True)


setup(
    ext_modules=[make_extension(with_cuda=cuda_skip_reason() is None)],
    cmdclass={"build_ext": BuildWithCPUFallback.with_options(use_ninja=True), "build_py": BuildPyWithSources},
)
