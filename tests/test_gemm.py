"""minift's own float32 matrix multiply (csrc/cpu_sgemm.h) and the linear layer built on it
(csrc/linear.cpp): each product against a float64 one, held to 2x torch.mm's own float32 error (the
largest error and the root-mean-square one), for both operands' layouts, ragged shapes, row strides,
with and without bias; the linear layer's three gradients against F.linear's; the dispatch rule."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minift import ops

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="minift._C is not built")


own_kernel_built = ops.own_gemm_built


@pytest.fixture
def backend(request):
    """Runs the test with the float32 CPU matmul set to request.param, and puts the choice back."""
    which = request.param
    if which == "minift" and not own_kernel_built():
        pytest.skip("this build has no own matmul (MINIFT_PORTABLE=1 or no AVX2)")
    with ops.using_gemm(which):
        yield which


def rnd(*shape, seed, scale=1.0):
    """Seeded, irregular: normal numbers with a spread of row scales, so sums cancel unevenly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    rows = torch.exp(torch.randn(shape[0], *[1] * (len(shape) - 1), generator=g, dtype=torch.float64))
    return (x * rows * scale).float()


def errs(a, ref):
    """(largest, root-mean-square) absolute error against the float64 product"""
    d = (a.double() - ref).abs()
    return d.max().item(), d.square().mean().sqrt().item()


def within_2x(ours, theirs, ref):
    """Both of ours' errors at most 2x torch's (floored at one float32 ulp of the largest entry,
    where torch's is exact: k = 1)."""
    ulp = torch.finfo(torch.float32).eps * ref.abs().max().item()
    return all(o <= max(2 * t, ulp) for o, t in zip(errs(ours, ref), errs(theirs, ref)))


# off the tile (14 x 32 under AVX-512, 6 x 16 under AVX2), the 256-deep blocks and the 64-long partial
# sums; and products small enough to stay with at::mm (m < 32 or under 2^18 multiply-adds)
SHAPES = [(1, 1, 1), (13, 17, 19), (3, 200, 40), (29, 5, 700), (45, 37, 300), (33, 100, 129),
          (130, 65, 700), (100, 77, 513), (864, 384, 384), (384, 96, 864)]


@pytest.mark.parametrize("backend", ["minift", "torch"], indirect=True)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, True), (False, False), (True, False), (True, True)])
def test_gemm_within_2x_torch_mm(backend, m, n, k, trans_a, trans_b):
    a = rnd(*((k, m) if trans_a else (m, k)), seed=m + 3 * k)
    b = rnd(*((n, k) if trans_b else (k, n)), seed=n + 7 * k, scale=0.1)
    bias = rnd(n, seed=5)
    A, B = (a.t() if trans_a else a), (b.t() if trans_b else b)
    for with_bias in (False, True):
        ref = A.double() @ B.double() + (bias.double() if with_bias else 0)
        ours = torch.ops.minift.gemm(a, b, trans_a, trans_b, bias if with_bias else None)
        theirs = torch.addmm(bias, A, B) if with_bias else A @ B
        assert ours.shape == (m, n) and ours.dtype == torch.float32 and ours.is_contiguous()
        assert within_2x(ours, theirs, ref), (with_bias, errs(ours, ref), errs(theirs, ref))


@pytest.mark.parametrize("backend", ["minift"], indirect=True)
def test_gemm_reads_row_strides_and_copies_other_layouts(backend):
    """A slice of a wider matrix (row stride > columns) is read in place; a column-strided view is
    copied first; the result is the same product."""
    wide_a, wide_b = rnd(50, 90, seed=1), rnd(700, 140, seed=2)
    a, b = wide_a[:, 3:73], wide_b[:70, 5:138]                    # (50, 70), (70, 133), row strides 90, 140
    ref = a.double() @ b.double()
    assert within_2x(torch.ops.minift.gemm(a, b, False, False, None), a @ b, ref)
    every_other = rnd(50, 140, seed=3)[:, ::2]                    # strides (140, 2): rows not contiguous
    ref = every_other.double() @ b.double()
    assert within_2x(torch.ops.minift.gemm(every_other, b, False, False, None), every_other @ b, ref)


@pytest.mark.parametrize("backend", ["minift"], indirect=True)
def test_gemm_empty_sum_is_the_bias(backend):
    a, b, bias = torch.empty(4, 0), torch.empty(0, 6), rnd(6, seed=1)
    assert torch.equal(torch.ops.minift.gemm(a, b, False, False, bias), bias.expand(4, 6))
    assert torch.equal(torch.ops.minift.gemm(a, b, False, False, None), torch.zeros(4, 6))
    assert torch.ops.minift.gemm(torch.empty(0, 5), rnd(5, 3, seed=2), False, False, None).shape == (0, 3)


@pytest.mark.parametrize("backend", ["minift", "torch"], indirect=True)
@pytest.mark.parametrize("shape,out", [((4, 9, 384), 1536), ((3, 1536), 384), ((2, 5, 7, 45), 33)])
def test_linear_and_its_three_gradients_within_2x_torch(backend, shape, out):
    x, w, b = rnd(*shape, seed=1), rnd(out, shape[-1], seed=2, scale=0.05), rnd(out, seed=3)
    dy = rnd(*shape[:-1], out, seed=4)

    def run(fn, dtype):
        ins = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        y = fn(*ins)
        return [y.detach()] + list(torch.autograd.grad(y, ins, dy.to(dtype)))

    ours = run(torch.ops.minift.linear_fwd, torch.float32)
    theirs = run(F.linear, torch.float32)
    ref = run(F.linear, torch.float64)
    for name, o, t, r in zip(["y", "dx", "dweight", "dbias"], ours, theirs, ref):
        assert o.shape == r.shape and o.dtype == torch.float32, name
        assert within_2x(o, t, r), (name, errs(o, r), errs(t, r))


@pytest.mark.parametrize("backend", ["minift"], indirect=True)
def test_linear_computes_only_the_gradients_asked_for(backend):
    x, w, b = rnd(6, 20, seed=1), rnd(8, 20, seed=2), rnd(8, seed=3)
    w.requires_grad_()
    y = torch.ops.minift.linear_fwd(x, w, b)                     # x and b frozen (a LoRA base layer's input)
    y.sum().backward()
    assert x.grad is None and b.grad is None
    torch.testing.assert_close(w.grad, torch.ones(6, 8).t() @ x)
    y = torch.ops.minift.linear_fwd(x, w.detach(), None)
    assert not y.requires_grad


def test_linear_backward_formula_gradcheck():
    """float64 takes at::mm inside the same op and the same backward: gradcheck checks that wiring
    (dx = dy W, dW = dy^T x, db = the column sums) against finite differences."""
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.minift.linear_fwd, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: torch.ops.minift.linear_fwd(x, w, None), (x, w))


@pytest.mark.parametrize("backend", ["minift"], indirect=True)
def test_opcheck(backend):
    x, w, b = rnd(5, 12, seed=1), rnd(7, 12, seed=2), rnd(7, seed=3)
    torch.library.opcheck(torch.ops.minift.linear_fwd, (x.requires_grad_(), w.requires_grad_(), b))
    torch.library.opcheck(torch.ops.minift.gemm, (rnd(12, 5, seed=4), rnd(7, 12, seed=5), True, True, None))


@pytest.mark.parametrize("call,message", [
    (lambda: torch.ops.minift.gemm(torch.ones(3, 4), torch.ones(5, 6), False, False, None),
     "expected op(b) to have 4 rows"),
    (lambda: torch.ops.minift.gemm(torch.ones(3, 4), torch.ones(4, 6, dtype=torch.float64), False, False, None),
     "expected b of dtype Float like a, got Double"),
    (lambda: torch.ops.minift.gemm(torch.ones(3, 4), torch.ones(4, 6), False, False, torch.ones(5)),
     "expected a bias of shape (6,)"),
    (lambda: torch.ops.minift.gemm(torch.ones(3, 4, 1), torch.ones(4, 6), False, False, None),
     "expected two matrices"),
    (lambda: torch.ops.minift.linear_fwd(torch.ones(2, 3, 10), torch.ones(4, 9), None),
     "expected x (..., 9) for a weight of shape (out, in) = [4, 9], got x of shape [2, 3, 10]"),
    (lambda: torch.ops.minift.gemm_backend("mkl"), 'expected "minift", "torch" or "" (leave it), got "mkl"'),
    (lambda: ops.gemm_backend("fast"), "expected auto, minift or torch, got 'fast'"),
])
def test_bad_input_says_what_was_expected(call, message):
    with pytest.raises((RuntimeError, ValueError), match=None) as info:
        call()
    assert message in str(info.value)


def test_linear_runs_torch_outside_float32_cpu_without_autocast():
    """The dispatch rule of ops.linear: the compiled op only for float32 on the CPU, not under
    autocast (there torch's bfloat16 matmul is the fast one), and only where the backend is minift."""
    x, w, b = rnd(4, 8, seed=1).requires_grad_(), rnd(3, 8, seed=2), rnd(3, seed=3)
    if own_kernel_built():
        with ops.using_gemm("minift"):
            assert ops.linear(x, w, b).grad_fn.name().endswith("LinearFunction>")
            assert ops.linear(x.double(), w.double(), b.double()).grad_fn.name().endswith("LinearFunction>") is False
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert ops.linear(x, w, b).dtype == torch.bfloat16
    with ops.using_gemm("torch"):
        assert ops.linear(x, w, b).grad_fn.name().endswith("LinearFunction>") is False


def test_a_build_without_the_own_kernel_refuses_it_and_keeps_the_choice(monkeypatch):
    """Asking for minift's matmul where the build has none (MINIFT_PORTABLE=1, no AVX2) says why,
    and the matmul chosen before, with its reason, stays."""
    before, why = ops.gemm_backend(), ops.gemm_backend_why()
    monkeypatch.setattr(ops, "own_gemm_built", lambda: False)
    with pytest.raises(RuntimeError) as info:
        ops.gemm_backend("minift")
    assert "gemm_backend('minift'): minift's own matmul is not in this build" in str(info.value)
    assert ops.gemm_backend() == before and ops.gemm_backend_why() == why


def test_the_self_check_leaves_the_choice_and_its_reason():
    """The self-check runs the own kernel whatever the run chose (ops.using_gemm); after it,
    gemm_backend_why() still says what auto timed, not what the check set."""
    from minift import selfcheck
    before, why = ops.gemm_backend(), ops.gemm_backend_why()
    rows = [r for r in selfcheck.run([torch.device("cpu")]) if r.op == "linear_fwd"]
    assert rows and all(r.passed for r in rows)
    assert ops.gemm_backend() == before and ops.gemm_backend_why() == why


def test_auto_choice_times_both_and_says_so():
    code = ("from minift import ops; b = ops.gemm_backend(); print(b); print(ops.gemm_backend_why())")
    env = {**os.environ, "MINIFT_GEMM": "auto"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    backend, why = out.stdout.strip().splitlines()[-2:]
    assert backend in ("minift", "torch")
    if own_kernel_built():
        assert "ms with minift's (" in why and "GFLOP/s) on" in why, why
    env["MINIFT_GEMM"] = "torch"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-2:] == ["torch", "PyTorch's (torch.mm): MINIFT_GEMM=torch"]


@pytest.mark.parametrize("backend", ["minift"], indirect=True)
def test_model_with_own_matmul_matches_impl_torch(backend):
    """The whole classifier: loss and every parameter's gradient, impl="fused" (own matmuls in
    every linear layer) against impl="torch", same weights, no dropout."""
    import minift
    cfg = minift.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=160, max_position_embeddings=64, num_labels=3,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = minift.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 500, (5, 23), generator=g)
    mask = (torch.arange(23)[None] < torch.tensor([23, 20, 9, 17, 3])[:, None]).long()
    labels = torch.tensor([0, 2, 1, 1, 0])
    results = {}
    for impl in ("torch", "fused"):
        model.set_impl(impl)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results[impl] = [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(results["torch"]) == len(results["fused"])
    for a, b in zip(results["fused"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not ops.extension_available() or ops.own_gemm_built(),
                    reason="the build has the own kernel (this is the MINIFT_PORTABLE=1 build's case)")
def test_the_op_itself_refuses_minift_without_the_kernel():
    before = torch.ops.minift.gemm_backend("")
    with pytest.raises(RuntimeError) as info:
        torch.ops.minift.gemm_backend("minift")
    assert "this build has no own matrix multiply" in str(info.value)
    assert torch.ops.minift.gemm_backend("") == before
