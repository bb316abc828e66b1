"""Packaging: sdist and wheel, a CUDA build that fails leaving a working CPU build, the installed
wheel in a fresh virtual environment.

One build serves all three checks (compiling the extension is the slow part): `python -m build
--no-isolation` on a copy of the source tree, with torch made to look like a CUDA build and an nvcc
that always fails. setup.py must then build the CPU-only extension, say so, and record it; the sdist
must carry every source a build needs; the wheel, installed into a fresh venv, must import from
there, report the failed CUDA build in `minift doctor`, pass its self-check and a subset of the tests
run outside the source tree, and find its C++ sources for a just-in-time build.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_NVCC = """#!/bin/sh
# A stand-in nvcc: reports a CUDA 13 toolkit, and rejects every file it is asked to compile.
case "$*" in
  *--version*) echo "Cuda compilation tools, release 13.0, V13.0.88"; exit 0;;
esac
echo "fake.cu(1): error: this nvcc rejects every file (a test of minift's CPU fallback)" >&2
exit 1
"""

# Loaded by every Python started with this folder on PYTHONPATH: the build backend then sees a
# torch that claims CUDA, as on a GPU machine.
FAKE_CUDA_TORCH = """
import os
if os.environ.get("MINIFT_TEST_FAKE_CUDA") == "1":
    import torch
    import torch.utils.cpp_extension as cpp_extension
    torch.version.cuda = "13.0"
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]    # a CPU torch leaves it None
"""


def _source_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("build")
    if shutil.which("ninja") is None or shutil.which("c++") is None:
        pytest.skip("needs ninja and a C++ compiler")
    tmp = tmp_path_factory.mktemp("pkg")
    src = _source_copy(tmp / "src")
    cuda = tmp / "cuda"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "include").mkdir()
    (cuda / "bin" / "nvcc").write_text(FAKE_NVCC)
    (cuda / "bin" / "nvcc").chmod(0o755)
    fake = tmp / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(FAKE_CUDA_TORCH)
    env = {**os.environ, "CUDA_HOME": str(cuda), "PYTHONPATH": str(fake), "MINIFT_TEST_FAKE_CUDA": "1",
           "TORCH_CUDA_ARCH_LIST": "8.0", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)],
                       env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return {"tmp": tmp, "log": r.stdout + r.stderr, "sdist": next((tmp / "dist").glob("minift-*.tar.gz")),
            "wheel": next((tmp / "dist").glob("minift-*.whl"))}


def test_failed_cuda_build_falls_back_to_cpu_with_one_clear_paragraph(built):
    log = built["log"]
    assert "the CUDA kernels did not compile, so minift is being built with its CPU kernels only" in log
    assert "first error:" in log and "error" in log.split("first error:")[1].splitlines()[0]
    assert "MINIFT_NO_CUDA=1" in log and "DEBUG=1" in log
    with zipfile.ZipFile(built["wheel"]) as z:
        info = z.read("minift/_build_info.json").decode()
    assert '"cuda": "failed"' in info and "the CUDA build failed" in info


def test_sdist_carries_every_source_a_build_needs(built):
    with tarfile.open(built["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    needed = {"pyproject.toml", "setup.py", "README.md", "minift/_build.py", "minift/ops.py"}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert needed <= names, sorted(needed - names)
    assert any(n.endswith(".cu") for n in names) and any(n.endswith(".cuh") for n in names)


@pytest.fixture(scope="module")
def wheel_venv(built):
    """A fresh venv with minift installed only from the wheel. torch and the other dependencies are
    taken from this environment through a .pth line (installing torch again costs a minute); they
    carry no minift, so every `import minift` below can only find the wheel's."""
    venv = built["tmp"] / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    str(built["wheel"])], check=True, timeout=600)
    return {"py": py, "site": site, "cwd": built["tmp"]}


def _run(venv, *args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MINIFT_TEST_FAKE_CUDA")}
    return subprocess.run([str(venv["py"]), *args], cwd=venv["cwd"], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


def test_wheel_in_a_fresh_venv_imports_and_doctor_says_why_cpu_only(wheel_venv):
    code = textwrap.dedent("""
        import minift, minift.ops as ops
        print(minift.__file__)
        print(ops.source_dir())
        print(ops.extension_status())
    """)
    r = _run(wheel_venv, "-c", code)
    assert r.returncode == 0, r.stderr[-3000:]
    file, src, status = r.stdout.splitlines()[:3]
    assert file.startswith(str(wheel_venv["site"])), file
    # The just-in-time build of an installed wheel compiles the copy of csrc/ the wheel carries.
    assert src == str(wheel_venv["site"] / "minift" / "_csrc"), src
    shipped = {p.relative_to(src).as_posix() for p in Path(src).rglob("*") if p.is_file()}
    assert shipped == {p.relative_to(ROOT / "csrc").as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert "'mode': 'ahead-of-time'" in status
    r = _run(wheel_venv, "-m", "minift.cli", "doctor")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "CPU kernels only: CUDA kernels not built: the CUDA build failed (" in r.stdout
    assert " FAIL" not in r.stdout and " passed, 0 failed" in r.stdout


def test_wheel_in_a_fresh_venv_passes_the_kernel_tests(wheel_venv):
    tests = wheel_venv["cwd"] / "tests"
    tests.mkdir(exist_ok=True)
    for name in ("conftest.py", "test_functional.py", "test_ops.py", "test_optim.py"):
        shutil.copy(ROOT / "tests" / name, tests / name)
    r = _run(wheel_venv, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(tests))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
