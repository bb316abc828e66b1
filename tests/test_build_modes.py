"""The build modes: ahead of time (minift._C) and the fallback; the just-in-time build is tested on
an installed wheel in tests/test_packaging.py."""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter where importing minift._C fails, as on a machine where the
# install did not compile it.
BLOCK_AOT = textwrap.dedent("""
    import sys, importlib.abc
    class NoCompiledModule(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "minift._C":
                raise ImportError("no compiled minift._C (simulated)")
    sys.meta_path.insert(0, NoCompiledModule())
""")


def run_python(code: str, env_extra: dict, timeout=900) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", BLOCK_AOT + textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_fallback_without_compiler_warns_once_and_still_runs(tmp_path):
    code = """
        import warnings, torch, minift
        from minift import ops
        from minift.cli import main
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not ops.extension_available()
            assert not ops.extension_available()
        msgs = [str(w.message) for w in caught if "compiled kernels are not available" in str(w.message)]
        assert len(msgs) == 1, msgs
        print("WARNING:", msgs[0])
        cfg = minift.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        torch.manual_seed(0)
        m = minift.BertForSequenceClassification(cfg).eval()
        ids = torch.randint(1, 50, (2, 6))
        a = m.set_impl("fused")(ids, labels=torch.tensor([0, 1]))
        b = m.set_impl("torch")(ids, labels=torch.tensor([0, 1]))
        assert torch.allclose(a.logits, b.logits, atol=1e-6) and torch.allclose(a.loss, b.loss, atol=1e-6)
        main(["doctor"])
    """
    env = {"CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "PATH": os.environ["PATH"]}
    r = run_python(code, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "just-in-time build failed" in r.stdout
    assert "compiled kernels: fallback (plain PyTorch ops)" in r.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("name", ["attention_rows.cu", "attention_v1.cu", "attention_v3.cu", "elementwise.cu", "xent.cu"])
def test_cuda_kernels_compile_with_nvcc(tmp_path, name):
    """The .cu files include no torch header, so nvcc compiles them without a GPU or a CUDA torch,
    with the macros torch's CUDAExtension build adds (no implicit half/bfloat16 conversions), for
    sm_75 (T4: the tensor-core attention is compiled out there; see below) and sm_90 (H100). sm_80 (A100)
    compiles the same source lines as sm_90 (the only architecture test in the kernels is
    ``__CUDA_ARCH__ < 800``), so it is left out to save a third of the compile time."""
    arch_tests = {m for p in (ROOT / "csrc" / "cuda").glob("*.cu*")
                  for m in re.findall(r"__CUDA_ARCH__\s*[<>=]+\s*\d+", p.read_text())}
    assert arch_tests <= {"__CUDA_ARCH__ < 800"}, f"a new architecture branch: compile it here too: {arch_tests}"
    cu_files = sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert cu_files == ["attention_rows.cu", "attention_v1.cu", "attention_v3.cu", "elementwise.cu", "xent.cu"]
    torch_macros = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
    # For sm_75, a file with inline PTX, WMMA or an architecture branch is assembled to machine code (ptxas
    # rejects an instruction the T4 lacks); the others stop at PTX, which is where the compiler front end
    # has already refused anything sm_75 cannot do, at about 60% of the compile time.
    text = (ROOT / "csrc" / "cuda" / name).read_text()
    sm75 = "sm_75" if re.search(r"\basm\b|wmma|__CUDA_ARCH__\s*[<>=]", text) else "compute_75"
    r = subprocess.run(["nvcc", "-c", str(ROOT / "csrc" / "cuda" / name), "-std=c++17", "-O3", "--use_fast_math",
                        *torch_macros, "-gencode", f"arch=compute_75,code={sm75}",
                        "-gencode", "arch=compute_90,code=sm_90",
                        "-o", str(tmp_path / "out.o")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out.o").stat().st_size > 10_000


def _cuda_include_dir():
    """Where nvcc finds cuda_runtime.h, from its own dry run."""
    r = subprocess.run(["nvcc", "--dryrun", "-c", "probe.cu"], capture_output=True, text=True, timeout=60)
    m = re.search(r'INCLUDES="-I([^"]+)"', r.stdout + r.stderr)
    return Path(m.group(1)) if m else None


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("c++") is None, reason="needs nvcc and c++")
def test_cuda_glue_compiles(tmp_path):
    """cuda_ops.cpp (argument checks, registration for the CUDA key) against torch's c10/cuda headers
    and the CUDA runtime headers: a compile check without a CUDA build of torch. A CPU build of torch
    lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h; an empty stand-in takes its place."""
    from torch.utils.cpp_extension import include_paths
    cuda_include = _cuda_include_dir()
    assert cuda_include is not None and (cuda_include / "cuda_runtime_api.h").is_file(), cuda_include
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["c++", "-std=c++17", "-fsyntax-only", *[f"-I{p}" for p in include_paths()], f"-I{cuda_include}",
           f"-I{tmp_path}", f"-I{ROOT / 'csrc'}", "-DMINIFT_WITH_CUDA", str(ROOT / "csrc" / "cuda" / "cuda_ops.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_doctor_reports_mode(capsys):
    from minift.cli import main
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "compiled kernels: ahead-of-time" in out or "compiled kernels: just-in-time" in out
    assert "torch" in out


def test_precompiled_header_failure_falls_back_with_a_message(tmp_path, capsys, monkeypatch):
    """A compiler that cannot build the precompiled header: no flags (the kernels compile without it),
    one line saying so, and no stamp that would let a later build think it exists; MINIFT_NO_PCH=1
    skips it without a word."""
    from minift._build import precompiled_header
    monkeypatch.delenv("MINIFT_NO_PCH", raising=False)
    assert precompiled_header("false", ["-O3"], str(tmp_path / "pch")) == []
    out = capsys.readouterr().out
    assert out.startswith("minift: no precompiled header (") and "compile without it" in out
    assert not (tmp_path / "pch" / "minift_pch.h.stamp").exists()
    monkeypatch.setenv("MINIFT_NO_PCH", "1")
    assert precompiled_header("c++", ["-O3"], str(tmp_path / "off")) == []
    assert capsys.readouterr().out == "" and not (tmp_path / "off").exists()


FAKE_CXX = """#!/bin/sh
# Stands in for the compiler: notes each call and writes the file after -o.
echo "$*" >> "$(dirname "$0")/calls"
while [ $# -gt 1 ]; do [ "$1" = "-o" ] && echo gch > "$2"; shift; done
"""


def test_precompiled_header_is_rebuilt_when_torch_changes_under_the_same_paths(tmp_path, monkeypatch):
    """The stamp that lets a build reuse its precompiled header covers more than the command: torch
    upgraded in place keeps its include paths (the same command), and GCC would load a header compiled
    from the old torch. A changed header file or torch version must rebuild it; nothing changed, not."""
    import torch
    import torch.utils.cpp_extension as cpp_extension

    from minift._build import PCH_HEADERS, precompiled_header
    monkeypatch.delenv("MINIFT_NO_PCH", raising=False)
    cxx = tmp_path / "cxx"
    cxx.write_text(FAKE_CXX)
    cxx.chmod(0o755)
    include = tmp_path / "include"
    for h in PCH_HEADERS:
        (include / h).parent.mkdir(parents=True, exist_ok=True)
        (include / h).write_text("#pragma once\n")
    monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, **k: [str(include)])

    def builds():
        assert precompiled_header(str(cxx), ["-O3"], str(tmp_path / "pch")) != []
        return len((tmp_path / "calls").read_text().splitlines())
    assert builds() == 1
    assert builds() == 1                                   # up to date: reused
    (include / PCH_HEADERS[0]).write_text("#pragma once\nint changed;\n")
    assert builds() == 2                                   # a header of torch changed
    assert builds() == 2
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    assert builds() == 3                                   # another torch version


FAKE_PYTHON = """#!/bin/sh
# Stands in for python in scripts/setup.sh: every pip install succeeds at once, except minift's own
# (-e .), which prints a compiler error and fails, as a broken build does.
case "$*" in
  *"-e ."*) echo "csrc/attention.cpp:1: error: a broken build"; sleep 1; exit 3;;
esac
exit 0
"""


def test_setup_test_mode_reports_a_failed_build_with_its_log(tmp_path):
    """setup.sh --test builds minift while the test-only packages install: a failed build must stop
    the script with the build's exit code, its compiler output and a line saying what failed."""
    py = tmp_path / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    (tmp_path / "chromium").write_text("#!/bin/sh\nexit 0\n")       # never reach for apt-get here
    (tmp_path / "chromium").chmod(0o755)
    env = {**os.environ, "PYTHON": str(py), "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--test"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "csrc/attention.cpp:1: error: a broken build" in r.stdout
    assert "installing minift (pip install --no-build-isolation -e .) failed: its output is above" in r.stderr


def _fake_compiler(path: Path, libstdcxx_answer: str) -> str:
    """A c++ stand-in that answers -print-file-name=libstdc++.so as given (a static-only toolchain
    answers the bare name) and hands anything else to the real compiler."""
    real = shutil.which("c++") or shutil.which("g++")
    path.write_text(f'#!/bin/sh\nif [ "$1" = "-print-file-name=libstdc++.so" ]; then echo "{libstdcxx_answer}"; '
                    f'exit 0; fi\nexec "{real}" "$@"\n')
    path.chmod(0o755)
    return str(path)


@pytest.mark.skipif(sys.platform != "linux" or not (shutil.which("c++") or shutil.which("g++")),
                    reason="a Linux C++ compiler")
def test_a_compiler_with_only_the_static_libstdcxx_is_replaced(tmp_path, monkeypatch):
    """Seen on a GPU machine: CXX named a GCC with only libstdc++.a, minift._C carried its own copy of
    the C++ runtime and crashed (segmentation fault) on the first error message it formatted. The
    build now picks a c++/g++ on PATH that links the shared library, and says so."""
    from minift import _build
    real = shutil.which("c++") or shutil.which("g++")
    assert _build.links_shared_libstdcxx(real) is True
    static = _fake_compiler(tmp_path / "g++-static", "libstdc++.so")
    assert _build.links_shared_libstdcxx(static) is False
    assert _build.links_shared_libstdcxx(str(tmp_path / "missing")) is None
    assert _build.links_shared_libstdcxx(f"{real} -m64") is True          # CXX with options
    assert _build.compiler_of("ccache g++") == "g++" and _build.compiler_of("g++ -m64") == "g++"
    monkeypatch.setenv("CXX", static)
    note = _build.choose_cxx()
    assert "finds no shared libstdc++.so" in note and os.environ["CXX"] != static
    assert _build.links_shared_libstdcxx(os.environ["CXX"]) is True
    monkeypatch.setenv("CXX", real)
    assert _build.choose_cxx() is None and os.environ["CXX"] == real
    # doctor names the compiler CXX gives, and says the build will not use it
    r = subprocess.run([sys.executable, "-m", "minift.cli", "doctor"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "CXX": static, "MINIFT_NO_EXTENSION": "1"}, cwd=ROOT)
    line = next(x for x in r.stdout.splitlines() if x.startswith("C++ compiler"))
    assert f"(CXX={static})" in line and "finds only the static libstdc++: the build picks another compiler" in line
    # no good compiler anywhere: a clear error instead of a module that crashes
    only = tmp_path / "bin"
    only.mkdir()
    for name in ("c++", "g++"):
        _fake_compiler(only / name, "libstdc++.so")
    monkeypatch.setenv("PATH", str(only))
    monkeypatch.setenv("CXX", static)
    with pytest.raises(RuntimeError, match="no c\\+\\+ or g\\+\\+ on PATH does"):
        _build.choose_cxx()


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_accurate_exp_and_log_of_the_cuda_kernels(tmp_path):
    """csrc/cuda/accurate_math.h (the exp and log of the CUDA cross-entropy, which replace the fast-math
    intrinsics) compiled for the CPU from the same lines (2^n too: built from its bits on both), against
    double precision on 2 million seeded random arguments each: exp within 1.5 ulp over the whole
    normal range, up to the largest float (where 2^n needs two steps); log within 2 ulp, and
    over [1, 40000] (a softmax row's sum of exponentials) no larger in absolute error than 1.2x the C
    library's logf."""
    src = tmp_path / "probe.cpp"
    src.write_text(textwrap.dedent(f"""
        #include "{ROOT / 'csrc' / 'cuda' / 'accurate_math.h'}"
        #include <cmath>
        #include <cstdio>
        #include <random>
        static double ulps(float got, double want) {{
          float w = (float)want;
          double ulp = std::nextafter(std::fabs(w), INFINITY) - std::fabs(w);
          return std::fabs((double)got - want) / ulp;
        }}
        int main() {{
          std::mt19937 g(7);
          std::uniform_real_distribution<float> ux(-87.3f, 88.72f), ue(-120.f, 120.f), us(0.f, 15.3f);
          double e = 0, l = 0, ours = 0, libm = 0;
          for (int i = 0; i < 2000000; ++i) {{
            float x = i % 2 ? ux(g) : (float)(i - 1000000) * 1e-6f;
            e = std::fmax(e, ulps(minift::exp_f32(x), std::exp((double)x)));
            float y = std::exp2(ue(g));
            l = std::fmax(l, ulps(minift::log_f32(y), std::log((double)y)));
            float s = std::exp2(us(g));
            double want = std::log((double)s);
            ours = std::fmax(ours, std::fabs(minift::log_f32(s) - want));
            libm = std::fmax(libm, std::fabs(std::log(s) - want));
          }}
          std::printf("%.4f %.4f %.4g %.4g %g %g %g\\n", e, l, ours, libm, minift::exp_f32(-INFINITY),
                      minift::exp_f32(100.f), minift::log_f32(0.f));
        }}
    """))
    exe = tmp_path / "probe"
    r = subprocess.run(["c++", "-O2", "-std=c++17", str(src), "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    e, l, ours, libm, exp_neg_inf, exp_big, log_zero = map(float, subprocess.run(
        [str(exe)], capture_output=True, text=True, check=True).stdout.split())
    assert e <= 1.5 and l <= 2.0, (e, l)
    assert ours <= 1.2 * libm, (ours, libm)
    assert exp_neg_inf == 0.0 and exp_big == float("inf") and log_zero == float("-inf")


def test_cpu_flags_pick_the_widest_vectors_the_cpu_has(tmp_path, monkeypatch):
    """AVX-512 (16-float Vectorized) where the CPU has AVX512F/BW/VL/DQ, AVX2 where it has only
    AVX2/FMA/F16C, plain loops otherwise or with MINIFT_PORTABLE=1; MINIFT_SIMD=avx2 keeps AVX2 on an
    AVX-512 CPU, and MINIFT_SIMD=avx512 where there is none is an error naming the file."""
    from minift import _build
    monkeypatch.setattr(_build.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("MINIFT_PORTABLE", raising=False)
    monkeypatch.delenv("MINIFT_SIMD", raising=False)
    base = "fpu sse sse2 avx avx2 fma f16c"
    cpus = {"avx512": base + " avx512f avx512dq avx512bw avx512vl avx512_bf16",
            "avx512f_only": base + " avx512f",          # no BW/VL/DQ: ATen's AVX512 build needs them
            "avx2": base, "old": "fpu sse sse2 avx"}
    files = {}
    for name, flags in cpus.items():
        files[name] = tmp_path / name
        files[name].write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")

    def capability(name):
        flags = _build.cpu_flags(str(files[name]))
        return [f for f in flags if f.startswith("-DCPU_CAPABILITY=")], flags

    assert capability("avx512") == (["-DCPU_CAPABILITY=AVX512"], _build.AVX512_FLAGS + ["-ffp-contract=off"])
    assert capability("avx512f_only")[0] == ["-DCPU_CAPABILITY=AVX2"]
    assert capability("avx2") == (["-DCPU_CAPABILITY=AVX2"], _build.AVX2_FLAGS + ["-ffp-contract=off"])
    assert capability("old") == ([], [])
    monkeypatch.setenv("MINIFT_SIMD", "avx2")
    assert capability("avx512")[0] == ["-DCPU_CAPABILITY=AVX2"]
    monkeypatch.setenv("MINIFT_SIMD", "avx512")
    lacks = f"MINIFT_SIMD=avx512: this CPU lacks AVX512F/BW/VL/DQ (see {files['avx2']})"
    with pytest.raises(ValueError, match=re.escape(lacks)):
        capability("avx2")
    monkeypatch.setenv("MINIFT_SIMD", "sse")
    with pytest.raises(ValueError, match="MINIFT_SIMD: expected avx512 or avx2"):
        capability("avx512")
    monkeypatch.delenv("MINIFT_SIMD")
    monkeypatch.setenv("MINIFT_PORTABLE", "1")
    assert capability("avx512") == ([], [])
