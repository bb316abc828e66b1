"""Packaging: sdist and wheel, a CUDA build that fails leaving a working CPU build, the installed
wheel in a fresh virtual environment, and its just-in-time build.

One build serves all of it (compiling the extension is the slow part): `python -m build
--no-isolation` on a copy of the source tree, with torch made to look like a CUDA build and an nvcc
that always fails. setup.py must then build the CPU-only extension, say so, and record it; the sdist
must carry every source a build needs; the wheel, installed into a fresh venv, must import from
there, report the failed CUDA build in `minift doctor`, pass its self-check and the tests that need
no source tree; and with its compiled module deleted it must compile the C++ sources it carries
just in time (the in-tree just-in-time build is the same code path, so it is not tested twice).
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


def _build(tmp: Path) -> dict:
    """python -m build --no-isolation on a copy of the tree, torch faking CUDA, nvcc failing."""
    src = _source_copy(tmp / "src")
    cuda = tmp / "cuda"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "include").mkdir()
    (cuda / "bin" / "nvcc").write_text(FAKE_NVCC)
    (cuda / "bin" / "nvcc").chmod(0o755)
    fake = tmp / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(FAKE_CUDA_TORCH)
    # MINIFT_NO_CUDA is left out: this build is meant to try CUDA (and fail)
    env = {**{k: v for k, v in os.environ.items() if k != "MINIFT_NO_CUDA"}, "CUDA_HOME": str(cuda), "PYTHONPATH": str(fake), "MINIFT_TEST_FAKE_CUDA": "1",
           "TORCH_CUDA_ARCH_LIST": "8.0", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)],
                       env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return {"log": r.stdout + r.stderr, "sdist": next((tmp / "dist").glob("minift-*.tar.gz")),
            "wheel": next((tmp / "dist").glob("minift-*.whl"))}


def _run(venv, *args, timeout=1500, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MINIFT_TEST_FAKE_CUDA")}
    return subprocess.run([str(venv["py"]), *args], cwd=venv["cwd"], env={**base, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=timeout)


def _fresh_venv(tmp: Path, wheel: Path) -> dict:
    """A fresh venv with minift installed only from the wheel. torch and the other dependencies are
    taken from this environment through a .pth line (installing torch again costs a minute); they
    carry no minift, so every `import minift` there can only find the wheel's."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=600)
    return {"py": py, "site": site, "cwd": tmp}


def test_sdist_and_wheel_with_a_failing_cuda_build(tmp_path):
    """One test, in order, because each step needs the one before (and one build is the cost)."""
    pytest.importorskip("build")
    if shutil.which("ninja") is None or shutil.which("c++") is None:
        pytest.skip("needs ninja and a C++ compiler")
    built = _build(tmp_path)

    # 1. The CUDA build failed, and the CPU build took its place, with one clear paragraph.
    log = built["log"]
    assert "the CUDA kernels did not compile, so minift is being built with its CPU kernels only" in log
    assert "error" in log.split("first error:")[1].splitlines()[0]
    assert "MINIFT_NO_CUDA=1" in log and "DEBUG=1" in log
    with zipfile.ZipFile(built["wheel"]) as z:
        info = z.read("minift/_build_info.json").decode()
    assert '"cuda": "failed"' in info and "the CUDA build failed" in info

    # 2. The sdist carries every source a build needs.
    with tarfile.open(built["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    needed = {"pyproject.toml", "setup.py", "README.md", "minift/_build.py", "minift/ops.py"}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert needed <= names, sorted(needed - names)

    # 3. The wheel in a fresh venv: minift from there, doctor says why CPU only, the self-check passes.
    venv = _fresh_venv(tmp_path, built["wheel"])
    r = _run(venv, "-c", "import minift, minift.ops as ops; print(minift.__file__); print(ops.source_dir()); "
                         "print(ops.extension_status())")
    assert r.returncode == 0, r.stderr[-3000:]
    file, src, status = r.stdout.splitlines()[:3]
    assert file.startswith(str(venv["site"])), file
    assert "'mode': 'ahead-of-time'" in status
    # the wheel carries csrc/ for a just-in-time build
    assert src == str(venv["site"] / "minift" / "_csrc"), src
    shipped = {p.relative_to(src).as_posix() for p in Path(src).rglob("*") if p.is_file()}
    assert shipped == {p.relative_to(ROOT / "csrc").as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    r = _run(venv, "-m", "minift.cli", "doctor")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "CPU kernels only: CUDA kernels not built: the CUDA build failed (" in r.stdout
    assert " FAIL" not in r.stdout and " passed, 0 failed" in r.stdout

    # 4. The tests that need no source tree pass against the installed wheel.
    tests = tmp_path / "tests"
    tests.mkdir()
    for name in ("conftest.py", "test_functional.py", "test_dispatch.py"):
        shutil.copy(ROOT / "tests" / name, tests / name)
    r = _run(venv, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(tests))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout

    # 5. Without its compiled module, the installed package builds itself just in time from the
    #    sources it carries, and the kernels work (gradcheck in float64).
    next(venv["site"].glob("minift/_C*.so")).unlink()
    code = textwrap.dedent("""
        import torch
        from minift import ops
        s = ops.extension_status()
        assert s["mode"] == "just-in-time", s
        z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
        t = torch.tensor([0, 1, 2, -100, 6])
        assert torch.autograd.gradcheck(lambda z: ops.softmax_cross_entropy(z, t), (z,))
        print("JIT OK", s["reason"])
    """)
    r = _run(venv, "-c", code, TORCH_EXTENSIONS_DIR=str(tmp_path / "jit"), MAX_JOBS="2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "JIT OK" in r.stdout
