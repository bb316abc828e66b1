"""One dispatch rule for every public op, the self-check that earns the kernels' use, the one mask
convention, and `import minift` reaching its submodules."""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minift
from minift import functional as RF
from minift import ops, selfcheck

ROOT = Path(__file__).resolve().parent.parent
needs_kernels = pytest.mark.skipif(not ops.extension_available(), reason="minift._C is not built")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=600)


# ------------------------------------------------------------------------------------------
# The dispatch rule
# ------------------------------------------------------------------------------------------

def test_without_the_extension_every_public_op_runs_plain_pytorch_and_says_why_once():
    r = _python("""
        import warnings, torch, torch.nn.functional as F
        from minift import ops, optim
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
        z, t = torch.randn(6, 4, generator=g), torch.tensor([0, 3, 1, -100, 2, 2])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                out = ops.fused_attention(q, k, v)
                loss = ops.softmax_cross_entropy(z, t)
                y = ops.fused_dropout(torch.ones(10), 0.5)
                p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
                optim.AdamW([p], lr=0.1, fused=True).step()
        assert torch.allclose(out, torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v, atol=1e-6)
        assert torch.equal(loss, F.cross_entropy(z, t))
        assert set(y.unique().tolist()) <= {0.0, 2.0}
        msgs = [str(w.message) for w in caught]
        for name in ("fused_attention", "softmax_cross_entropy", "fused_dropout", "adamw_step_"):
            mine = [m for m in msgs if m.startswith(f"minift: {name} runs plain PyTorch on cpu")]
            assert len(mine) == 1, (name, msgs)
            assert "MINIFT_NO_EXTENSION=1" in mine[0], mine[0]
        print("OK")
    """, MINIFT_NO_EXTENSION="1")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


@needs_kernels
def test_a_device_without_a_kernel_falls_back_with_the_reason(monkeypatch):
    """As CUDA tensors in a CPU-only build: the op is not registered for the device, so the plain
    path runs (with one warning naming why) instead of reaching the dispatcher with no kernel."""
    monkeypatch.setattr(ops, "_registered", lambda op, device_type: op != "xent_fwd")
    monkeypatch.setattr(ops._state, "verdicts", {})
    monkeypatch.setattr(ops._state, "warned", set())
    z, t = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    with pytest.warns(RuntimeWarning, match="softmax_cross_entropy runs plain PyTorch on cpu.*has no cpu kernel"):
        loss = ops.softmax_cross_entropy(z, t)
    assert torch.equal(loss, F.cross_entropy(z, t))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # once per (op, device): no second warning
        ops.softmax_cross_entropy(z, t)


@needs_kernels
def test_a_dtype_the_kernel_does_not_take_falls_back(monkeypatch):
    """AdamW's compiled step takes float32/float64: a bfloat16 parameter takes the plain update, the
    same one the loop does, with one warning."""
    monkeypatch.setattr(ops._state, "warned", set())
    g = torch.Generator().manual_seed(1)
    p1 = torch.nn.Parameter(torch.randn(7, 3, generator=g).bfloat16())
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1, o2 = minift.optim.AdamW([p1], lr=1e-2, fused=True), minift.optim.AdamW([p2], lr=1e-2)
    with pytest.warns(RuntimeWarning, match="adamw_step_ runs plain PyTorch on cpu .*takes no torch.bfloat16"):
        for _ in range(3):
            grad = torch.randn(7, 3, generator=g).bfloat16()
            p1.grad, p2.grad = grad.clone(), grad.clone()
            o1.step()
            o2.step()
    assert torch.equal(p1, p2)


# ------------------------------------------------------------------------------------------
# The self-check
# ------------------------------------------------------------------------------------------

@needs_kernels
def test_selfcheck_passes_every_cpu_kernel_in_every_dtype():
    rows = selfcheck.run([torch.device("cpu")])
    seen = {(r.op, r.dtype) for r in rows}
    for op, dtypes in ops.KERNEL_DTYPES["cpu"].items():
        assert {(op, str(d).replace("torch.", "")) for d in dtypes} <= seen, op
    failed = [r for r in rows if not r.passed]
    assert not failed, selfcheck.format_table(failed)
    assert all(0 < r.limit < 0.1 for r in rows)


@needs_kernels
def test_selfcheck_catches_a_wrong_kernel_reports_it_and_auto_does_not_use_it():
    """A cross-entropy kernel that is 1% off is registered in place of the real one: the self-check
    fails it, `minift doctor` says FAIL and exits 1, and --impl auto runs plain PyTorch for it
    (the other kernels stay in use)."""
    r = _python("""
        import warnings, torch, torch.nn.functional as F
        import minift.ops as ops
        from minift.cli import main
        from minift.selfcheck import resolve_impl
        assert ops.extension_available()
        lib = torch.library.Library("minift", "IMPL")
        def off_by_one_percent(logits, target, weight, ignore_index, smoothing, reduction):
            z = logits.detach().double()
            rows = F.cross_entropy(z, target, ignore_index=ignore_index, label_smoothing=smoothing, reduction="none")
            kept = (target != ignore_index).sum().clamp_min(1)
            loss = [rows, rows.sum() / kept, rows.sum()][reduction] * 1.01
            acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
            m = z.amax(-1)                                   # the row statistics: max, log sum exp(z - max)
            return loss.to(acc), torch.stack([m, torch.logsumexp(z, -1) - m]).to(acc)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lib.impl("xent_fwd", off_by_one_percent, "CPU")
        code = main(["doctor"])
        assert code == 1, code
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert resolve_impl("auto", "cpu") == "fused"
            z, t = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
            loss = ops.softmax_cross_entropy(z, t)
            q = torch.randn(1, 2, 4, 8)
            ops.fused_attention(q, q, q)
        msgs = [str(w.message) for w in caught]
        assert any("self-check failed the compiled cross-entropy fwd+bwd on cpu" in m for m in msgs), msgs
        assert any("softmax_cross_entropy runs plain PyTorch on cpu" in m and "self-check failed" in m for m in msgs)
        assert torch.equal(loss, F.cross_entropy(z, t))                 # the plain path, not the bad kernel
        assert not any("fused_attention" in m for m in msgs), msgs      # the good kernels stay
        print("CAUGHT")
    """)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "CAUGHT" in r.stdout
    table = r.stdout.split("self-check:")[1]
    assert [line for line in table.splitlines() if line.startswith("cross-entropy") and "FAIL" in line]
    assert [line for line in table.splitlines() if line.startswith("attention") and "PASS" in line]


@needs_kernels
def test_doctor_prints_the_table_all_pass(capsys):
    from minift.cli import main
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "kernel" in out and "limit" in out and "FAIL" not in out
    # a row per check and dtype, but the autocast rows only in the reduced dtypes
    reduced = {torch.float16, torch.bfloat16}
    assert out.count("PASS") == sum(len(ops.KERNEL_DTYPES["cpu"][op] & reduced if "autocast" in name
                                        else ops.KERNEL_DTYPES["cpu"][op]) for name, op, _, _ in selfcheck.CHECKS)
    assert out.count("cross-entropy weighted") == len(ops.KERNEL_DTYPES["cpu"]["xent_fwd"])
    assert out.count("autocast dtypes") == 4


# ------------------------------------------------------------------------------------------
# One mask convention: bool or 0/1 = keep; an additive mask is refused, never inverted
# ------------------------------------------------------------------------------------------

ATTENTIONS = {"naive": RF.naive_attention, "reference": RF.attention, "fused": ops.fused_attention}


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_masks_of_any_dtype_with_0_1_values_mean_keep(name):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    expected = ATTENTIONS[name](q, k, v, keep.bool())
    for mask in (keep, keep.float(), keep.to(torch.uint8), keep.double()):
        torch.testing.assert_close(ATTENTIONS[name](q, k, v, mask), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_an_additive_mask_is_refused_with_the_convention(name):
    q = torch.randn(1, 1, 3, 4)
    additive = torch.tensor([[0.0, 0.0, -1e4]])
    with pytest.raises(ValueError, match=r"expected bool or 0/1 values \(1 = attend, 0 = padding\).*"
                                         r"\[-10000, 0\].*additive mask.*\(mask == 0\)"):
        ATTENTIONS[name](q, q, q, additive)


def test_the_model_refuses_an_additive_attention_mask():
    cfg = minift.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32)
    model = minift.BertModel(cfg).eval()
    ids = torch.tensor([[5, 6, 7, 0]])
    with pytest.raises(ValueError, match="attention_mask: expected bool or 0/1 values"):
        model(ids, torch.tensor([[0.0, 0.0, 0.0, float("-inf")]]))
    a = model(ids, torch.tensor([[1, 1, 1, 0]])).last_hidden_state
    b = model(ids, torch.tensor([[1.0, 1.0, 1.0, 0.0]])).last_hidden_state
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# import minift
# ------------------------------------------------------------------------------------------

def test_import_minift_reaches_submodules_lazily():
    r = _python("""
        import sys, minift
        lazy = ("minift.optim", "minift.ops", "minift.data", "minift.selfcheck")
        assert not any(m in sys.modules for m in lazy), [m for m in lazy if m in sys.modules]
        assert minift.optim.AdamW and minift.ops.fused_attention and minift.data.split_of
        assert minift.functional.gelu and "optim" in dir(minift)
        try:
            minift.no_such_thing
        except AttributeError as e:
            assert "no_such_thing" in str(e)
        print("LAZY OK")
    """)
    assert r.returncode == 0 and "LAZY OK" in r.stdout, r.stderr[-3000:]


def test_a_module_built_for_wider_vectors_than_this_cpu_is_not_imported():
    """minift._C built on an AVX-512 machine (its build record says so) and then found on a CPU
    without AVX-512: importing it would die on the first AVX-512 instruction (SIGILL), so minift
    does not import it and says why (here the just-in-time build is a stub that fails)."""
    r = _python("""
        import warnings
        from minift import _build, ops
        ops._build_record = lambda: {"cuda": "skipped", "detail": "test", "simd": "AVX512"}
        _build._cpu_words = lambda *a: {"avx2", "fma", "f16c"}      # an AVX2-only CPU
        def no_jit():
            raise RuntimeError("just-in-time build skipped by the test")
        ops._jit_build = no_jit
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            print(ops.extension_available())
        print(ops.extension_status()["reason"])
        print(_build.cpu_runs("AVX2"), _build.cpu_runs("none"))
    """)
    assert r.returncode == 0, r.stderr
    available, reason, others = r.stdout.strip().splitlines()
    assert available == "False"
    assert reason == ("minift._C did not load (it was built for AVX512 vectors, which this CPU lacks) "
                      "and the just-in-time build failed: just-in-time build skipped by the test"), reason
    assert others == "True True"
