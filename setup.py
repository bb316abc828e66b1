"""Builds minift and its compiled extension minift._C.

CPU kernels (csrc/*.cpp) are always compiled; CUDA kernels (csrc/cuda/*.cu) are added when the
installed torch has CUDA and nvcc is found. DEBUG=1 builds with -O0 -g; MINIFT_NO_CUDA=1 skips CUDA;
MINIFT_PORTABLE=1 leaves out the AVX2 flags (minift/_build.py).
Install with:  pip install --no-build-isolation -e .
"""
import glob
import importlib.util
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

debug = os.environ.get("DEBUG", "0") == "1"
use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
            and os.environ.get("MINIFT_NO_CUDA", "0") != "1")

sources = sorted(glob.glob("csrc/*.cpp"))
cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
cxx_flags += ["-fopenmp"] if os.name != "nt" else []
_spec = importlib.util.spec_from_file_location("minift_build", os.path.join("minift", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)
cxx_flags += _build.cpu_flags()                 # AVX2 for the CPU kernels when this CPU has it
extra = {"cxx": cxx_flags}
ext_class = CppExtension
define_macros = []
if use_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    extra["nvcc"] = ["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math", "-lineinfo"]
    ext_class = CUDAExtension
    define_macros.append(("MINIFT_WITH_CUDA", None))

setup(
    name="minift",
    version="0.1.0",
    description="A from-scratch, educational BERT encoder and fine-tuning library",
    packages=find_packages(include=["minift", "minift.*"]),
    package_data={"minift.assignments": ["*/*.py", "*/*.cpp"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tokenizers>=0.15", "safetensors", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "transformers"], "build": ["ninja", "pybind11"]},
    ext_modules=[ext_class("minift._C", sources, extra_compile_args=extra,
                           extra_link_args=["-fopenmp"] if os.name != "nt" else [],
                           define_macros=define_macros)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["minift=minift.cli:main"]},
)
