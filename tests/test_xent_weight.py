"""Per-class weights in the fused softmax cross-entropy (issue 17): the CPU kernel and the
hand-derived reference (minift.functional.cross_entropy) against F.cross_entropy(weight=...),
whose meaning they follow: row n's loss (1 - eps) w_{y_n} (-log p_{y_n}) + (eps/C) sum_c w_c (-log p_c),
and "mean" = sum_n loss_n / sum_n w_{y_n} over the rows not ignored."""
import pytest
import torch
import torch.nn.functional as F

from minift import functional as RF
from minift import ops

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="minift._C is not built")

IGNORE = -100
# C <= 8: both short-row walkers; 9..16: the forward's short walker and the backward's long one;
# 17 and 300: long rows; N = 1500 at C = 3 splits the rows across threads
SHAPES = [(37, 2), (23, 5), (19, 9), (19, 16), (21, 17), (1500, 3), (7, 300)]


def make(N, C, dtype, seed=0):
    """Irregular logits, targets with every fifth row ignored, positive irregular class weights
    (one class weighted 0), an upstream gradient per row."""
    g = torch.Generator().manual_seed(seed * 100 + C)
    z = (torch.randn(N, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, C, (N,), generator=g)
    t[::5] = IGNORE
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 2 + 0.1)
    w[C // 2] = 0.0
    up = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    return z, t, w.to(dtype), up


def loss_and_grad(fn, z, t, w, eps, reduction, up):
    zz = z.clone().requires_grad_()
    loss = fn(zz, t, w, eps, reduction)
    (dz,) = torch.autograd.grad(loss, zz, up.to(loss.dtype) if reduction == "none" else None)
    return loss.detach(), dz


def torch_ce(z, t, w, eps, reduction):
    return F.cross_entropy(z, t, weight=w, ignore_index=IGNORE, label_smoothing=eps, reduction=reduction)


def fused_ce(z, t, w, eps, reduction):
    return ops.softmax_cross_entropy(z, t, ignore_index=IGNORE, label_smoothing=eps, reduction=reduction, weight=w)


def reference_ce(z, t, w, eps, reduction):
    return RF.cross_entropy(z, t, ignore_index=IGNORE, label_smoothing=eps, reduction=reduction, weight=w)


@pytest.mark.parametrize("impl", [fused_ce, reference_ce], ids=["fused", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("N,C", SHAPES)
def test_weighted_equals_torch(impl, dtype, reduction, eps, N, C):
    """Loss and gradient against F.cross_entropy(weight=...) in float64 on the same values: to
    float64 rounding for float64 inputs, to 1e-6 of the largest value for float32 (the loss comes
    back in float32 and the gradient in float32)."""
    z, t, w, up = make(N, C, dtype)
    loss, dz = loss_and_grad(impl, z, t, w, eps, reduction, up)
    ref, dref = loss_and_grad(torch_ce, z.double(), t, w.double(), eps, reduction, up)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    assert (loss.double() - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())
    assert (dz.double() - dref).abs().max() <= tol * max(1.0, dref.abs().max().item())
    assert (dz[t == IGNORE] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,C", [(37, 2), (19, 9), (7, 300)])
def test_weighted_low_precision(dtype, N, C):
    """float16/bfloat16 logits and weights, computed in float32: the loss against float64
    F.cross_entropy on the same values to float32 accuracy; the gradient, rounded to the dtype,
    to half a unit in its last place of the largest entry."""
    z, t, w, up = make(N, C, dtype, seed=1)
    for reduction in ("none", "mean"):
        for eps in (0.0, 0.1):
            loss, dz = loss_and_grad(fused_ce, z, t, w, eps, reduction, up)
            ref, dref = loss_and_grad(torch_ce, z.double(), t, w.double(), eps, reduction, up)
            assert loss.dtype == torch.float32
            assert (loss.double() - ref).abs().max() <= 1e-6 * max(1.0, ref.abs().max().item())
            assert (dz.double() - dref).abs().max() <= torch.finfo(dtype).eps * dref.abs().max().item()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_weighted_gradcheck_float64(reduction, eps):
    z = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_()
    t = torch.tensor([0, 4, IGNORE, 2, 1, 3, 4])
    w = torch.tensor([0.5, 2.0, 0.0, 1.25, 3.0], dtype=torch.float64)
    for impl in (fused_ce, reference_ce):
        assert torch.autograd.gradcheck(lambda z: impl(z, t, w, eps, reduction), (z,))


def test_weighted_mean_with_no_weight_left_is_zero():
    """Every kept row's target weighted 0 (or every row ignored): the mean divides by 0, and is 0
    with a zero gradient, where F.cross_entropy gives NaN (or inf)."""
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    for t in (torch.tensor([0, 0, IGNORE, 0]), torch.full((4,), IGNORE)):
        for impl in (fused_ce, reference_ce):
            loss = impl(z, t, w, 0.1, "mean")
            assert loss.item() == 0.0
            assert (torch.autograd.grad(loss, z)[0] == 0).all()


def test_weight_of_ones_is_the_unweighted_loss():
    z, t, _, up = make(41, 9, torch.float32)
    ones = torch.ones(9)
    for eps in (0.0, 0.1):
        for reduction in ("none", "mean", "sum"):
            a, da = loss_and_grad(fused_ce, z, t, ones, eps, reduction, up)
            b, db = loss_and_grad(fused_ce, z, t, None, eps, reduction, up)
            torch.testing.assert_close(a, b, rtol=2e-7, atol=0)
            torch.testing.assert_close(da, db, rtol=2e-7, atol=1e-9)


def test_weighted_thread_split_changes_nothing():
    z, t, w, up = make(3000, 5, torch.float32, seed=2)
    threads = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(loss_and_grad(fused_ce, z, t, w, 0.1, "none", up) + loss_and_grad(fused_ce, z, t, w, 0.1, "mean", up))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_weighted_opcheck():
    z = torch.randn(6, 4, requires_grad=True)
    t = torch.tensor([0, 1, IGNORE, 3, 2, 1])
    w = torch.tensor([1.0, 0.5, 2.0, 0.25])
    for reduction in (0, 1, 2):  # none, mean, sum
        torch.library.opcheck(torch.ops.minift.xent_fwd.default, (z, t, w, IGNORE, 0.1, reduction))
        _, stats = torch.ops.minift.xent_fwd(z.detach(), t, w, IGNORE, 0.1, reduction)
        g = torch.rand(6) if reduction == 0 else torch.tensor(0.7)
        torch.library.opcheck(torch.ops.minift.xent_bwd.default, (g, z.detach(), t, w, stats, IGNORE, 0.1, reduction))


BAD_WEIGHTS = [
    ("too short", lambda w: w[:3], RuntimeError, "expected weight of shape \\(C,\\) = \\(4,\\), one per class, got \\[3\\]"),
    ("2-d", lambda w: w[None], RuntimeError, "expected weight of shape \\(C,\\) = \\(4,\\)"),
    ("dtype", lambda w: w.double(), RuntimeError, "expected weight of dtype Float like the logits, got Double"),
    ("requires grad", lambda w: w.clone().requires_grad_(), RuntimeError, "class weights get no gradient"),
]


@pytest.mark.parametrize("name,make_bad,err,msg", BAD_WEIGHTS, ids=[b[0] for b in BAD_WEIGHTS])
def test_bad_weight(name, make_bad, err, msg):
    z = torch.randn(6, 4, requires_grad=True)
    t = torch.tensor([0, 1, IGNORE, 3, 2, 1])
    w = make_bad(torch.tensor([1.0, 0.5, 2.0, 0.25]))
    with pytest.raises(err, match=msg):
        ops.softmax_cross_entropy(z, t, weight=w)
    ref_err = {"dtype": TypeError}.get(name, ValueError)
    with pytest.raises(ref_err, match="weight"):
        RF.cross_entropy(z, t, weight=w)


@pytest.mark.skipif(not (torch.cuda.is_available() and ops.extension_status()["cuda"]),
                    reason="needs a GPU and the CUDA kernels")
def test_weight_refused_on_cuda():
    """The CUDA kernels take no class weights yet: the glue says so instead of ignoring them."""
    z, t = torch.randn(6, 4, device="cuda"), torch.tensor([0, 1, 2, 3, 2, 1], device="cuda")
    with pytest.raises(RuntimeError, match="per-class weights are not implemented in the CUDA kernels"):
        ops.softmax_cross_entropy(z, t, weight=torch.ones(4, device="cuda"))
