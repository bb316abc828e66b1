"""Per-class weights in the softmax cross-entropy (issue 17): the CPU kernel, the hand-derived
reference (minift.functional.cross_entropy) and the heads' loss against F.cross_entropy(weight=...),
whose meaning they follow: row n's loss (1 - eps) w_{y_n} (-log p_{y_n}) + (eps/C) sum_c w_c (-log p_c),
and "mean" = sum_n loss_n / sum_n w_{y_n} over the rows not ignored. On a device whose kernel takes
no weight (CUDA) the op runs F.cross_entropy through the dispatch rule; a bad weight is refused
with what was expected and what came."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import minift
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


def rel(x, ref):
    """max |x - ref| / max(1, max |ref|), in float64."""
    return ((x.double() - ref).abs().max() / max(1.0, ref.abs().max().item())).item()


@pytest.mark.parametrize("impl", [fused_ce, reference_ce], ids=["fused", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("N,C", SHAPES)
def test_weighted_equals_torch(impl, dtype, N, C):
    """Loss and gradient against F.cross_entropy(weight=...) in float64 on the same values, for
    every reduction, with and without label smoothing: to float64 rounding for float64 inputs,
    to 1e-6 of the largest value for float32 (loss and gradient come back in float32)."""
    z, t, w, up = make(N, C, dtype)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    for eps in (0.0, 0.1):
        for reduction in ("none", "mean", "sum"):
            loss, dz = loss_and_grad(impl, z, t, w, eps, reduction, up)
            ref, dref = loss_and_grad(torch_ce, z.double(), t, w.double(), eps, reduction, up)
            assert rel(loss, ref) <= tol, (eps, reduction)
            assert rel(dz, dref) <= tol, (eps, reduction)
            assert (dz[t == IGNORE] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,C", [(37, 2), (19, 9), (7, 300)])
def test_weighted_low_precision_within_2x_torch(dtype, N, C):
    """float16/bfloat16 logits and weights, computed in float32: loss and gradient against float64
    F.cross_entropy on the same values, at most twice PyTorch's own same-dtype error (floor: one
    unit in the last place of the dtype at the largest value)."""
    z, t, w, up = make(N, C, dtype, seed=1)
    ulp = torch.finfo(dtype).eps
    for reduction in ("none", "mean"):
        for eps in (0.0, 0.1):
            loss, dz = loss_and_grad(fused_ce, z, t, w, eps, reduction, up)
            ref, dref = loss_and_grad(torch_ce, z.double(), t, w.double(), eps, reduction, up)
            theirs, dtheirs = loss_and_grad(torch_ce, z, t, w, eps, reduction, up)
            assert loss.dtype == torch.float32
            assert rel(loss, ref) <= 2 * max(rel(theirs, ref), ulp), (reduction, eps)
            assert rel(dz, dref) <= 2 * max(rel(dtheirs, dref), ulp), (reduction, eps)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_weighted_gradcheck_float64(reduction):
    """gradcheck of the kernel and of the reference (and gradgradcheck of the reference, whose
    backward is itself differentiable), with and without smoothing, one target weighted 0."""
    z = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_()
    t = torch.tensor([0, 4, IGNORE, 2, 1, 3, 4])
    w = torch.tensor([0.5, 2.0, 0.0, 1.25, 3.0], dtype=torch.float64)
    for eps in (0.0, 0.1):
        for impl in (fused_ce, reference_ce):
            assert torch.autograd.gradcheck(lambda z: impl(z, t, w, eps, reduction), (z,))
        assert torch.autograd.gradgradcheck(lambda z: reference_ce(z, t, w, eps, reduction), (z,))


@pytest.mark.parametrize("magnitude", [1e5, 1e8, 1e30])
def test_weighted_equal_large_logits(magnitude):
    """Issue 15's example with class weights w = (2, 1/2, 1): three equal float32 logits of any
    magnitude have p = 1/3, so the loss is ((1 - eps) w_y + (eps/3) sum_c w_c) log 3 (the mean
    divides by w_y = 2) and the gradient a/3 - q_c, a = sum_c q_c."""
    w = torch.tensor([2.0, 0.5, 1.0])
    ulp = torch.finfo(torch.float32).eps
    for eps in (0.0, 0.1):
        q = eps / 3 * w.double()
        q[0] += (1 - eps) * 2.0
        a = q.sum()
        for reduction, scale in (("sum", 1.0), ("mean", 0.5)):
            z = torch.full((1, 3), magnitude, requires_grad=True)
            loss = fused_ce(z, torch.tensor([0]), w, eps, reduction)
            (dz,) = torch.autograd.grad(loss, z)
            assert abs(loss.item() - scale * a.item() * math.log(3)) <= 2 * ulp * loss.item()
            assert (dz.double()[0] - scale * (a / 3 - q)).abs().max() <= 2 * ulp * a


def test_weighted_mean_with_no_weight_left_is_zero():
    """Every kept row's target weighted 0 (or every row ignored): the mean divides by 0, and is 0
    with a zero gradient, where F.cross_entropy gives NaN (as the unweighted op does for a batch
    with every row ignored)."""
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    for t in (torch.tensor([0, 0, IGNORE, 0]), torch.full((4,), IGNORE)):
        assert torch_ce(z, t, w, 0.1, "mean").isnan()
        for impl in (fused_ce, reference_ce):
            loss = impl(z, t, w, 0.1, "mean")
            assert loss.item() == 0.0
            assert (torch.autograd.grad(loss, z)[0] == 0).all()


def test_weight_of_ones_is_the_unweighted_loss():
    """The weighted path with every w_c = 1 against the unweighted one, to float32 rounding (the
    weighted target entry is computed in double, the unweighted one in float32)."""
    z, t, _, up = make(41, 9, torch.float32)
    ones = torch.ones(9)
    ulp = torch.finfo(torch.float32).eps
    for eps in (0.0, 0.1):
        for reduction in ("none", "mean", "sum"):
            a, da = loss_and_grad(fused_ce, z, t, ones, eps, reduction, up)
            b, db = loss_and_grad(fused_ce, z, t, None, eps, reduction, up)
            torch.testing.assert_close(a, b, rtol=2 * ulp, atol=0)
            torch.testing.assert_close(da, db, rtol=0, atol=2 * ulp * db.abs().max().item())


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


# ------------------------------------------------------------------------------------------
# Bad weights: what was expected, what came
# ------------------------------------------------------------------------------------------

BAD_WEIGHTS = [
    ("too short", lambda w: w[:3], ValueError, r"expected weight of shape \(C,\) = \(4,\), one per class, got \(3,\)"),
    ("too long", lambda w: torch.cat([w, w]), ValueError, r"expected weight of shape \(C,\) = \(4,\).*got \(8,\)"),
    ("2-d", lambda w: w[None], ValueError, r"expected weight of shape \(C,\) = \(4,\), one per class, got \(1, 4\)"),
    ("0-d", lambda w: w[0], ValueError, r"expected weight of shape \(C,\) = \(4,\), one per class, got \(\)"),
    ("list", lambda w: w.tolist(), TypeError, r"expected weight to be a tensor of shape \(C,\) = \(4,\), got list"),
    ("dtype", lambda w: w.double(), TypeError, "expected weight of dtype torch.float32 like the logits, got torch.float64"),
    ("device", lambda w: w.to("meta"), ValueError, "expected weight on cpu like the logits, got meta"),
    ("negative", lambda w: w * torch.tensor([1.0, 1.0, -1.0, 1.0]), ValueError,
     r"expected finite class weights >= 0, got weight\[2\] = -2$"),
    ("NaN", lambda w: w * torch.tensor([1.0, float("nan"), 1.0, 1.0]), ValueError,
     r"expected finite class weights >= 0, got weight\[1\] = -?nan$"),
    ("requires grad", lambda w: w.clone().requires_grad_(), ValueError, r"the class weights get no gradient; pass weight.detach\(\)"),
]


@pytest.mark.parametrize("name,make_bad,err,msg", BAD_WEIGHTS, ids=[b[0] for b in BAD_WEIGHTS])
def test_bad_weight(name, make_bad, err, msg):
    z = torch.randn(6, 4, requires_grad=True)
    t = torch.tensor([0, 1, IGNORE, 3, 2, 1])
    w = make_bad(torch.tensor([1.0, 0.5, 2.0, 0.25]))
    with pytest.raises(err, match="softmax_cross_entropy: " + msg):
        ops.softmax_cross_entropy(z, t, weight=w)
    with pytest.raises(err, match="cross_entropy: " + msg):
        RF.cross_entropy(z, t, weight=w)


RAW_BAD_WEIGHTS = [
    (lambda w: w[:3], ValueError, r"expected weight of shape \(C,\) = \(4,\), one per class, got \[3\]"),
    (lambda w: w.double(), TypeError, "expected weight of dtype Float like the logits, got Double"),
    (lambda w: -w, ValueError, r"expected finite class weights >= 0, got weight\[0\] = -1$"),
    (lambda w: w / 0, ValueError, r"expected finite class weights >= 0, got weight\[0\] = inf$"),
]


@pytest.mark.parametrize("make_bad,err,msg", RAW_BAD_WEIGHTS)
def test_the_raw_ops_check_the_weight_too(make_bad, err, msg):
    """The C++ kernels' own checks (for callers of torch.ops.minift.* directly, and the values for
    softmax_cross_entropy, which leaves them to the kernel), forward and backward, with the
    exception types of the Python checks."""
    z, t = torch.randn(6, 4), torch.tensor([0, 1, IGNORE, 3, 2, 1])
    w = torch.tensor([1.0, 0.5, 2.0, 0.25])
    _, stats = torch.ops.minift.xent_fwd(z, t, w, IGNORE, 0.0, 1)
    with pytest.raises(err, match="softmax_cross_entropy: " + msg):
        torch.ops.minift.xent_fwd(z, t, make_bad(w), IGNORE, 0.0, 1)
    with pytest.raises(err, match="softmax_cross_entropy: " + msg):
        torch.ops.minift.xent_bwd(torch.tensor(1.0), z, t, make_bad(w), stats, IGNORE, 0.0, 1)


# ------------------------------------------------------------------------------------------
# The dispatch rule: a kernel that takes no weight (CUDA's) leaves a weighted call to PyTorch
# ------------------------------------------------------------------------------------------

def test_a_kernel_without_weights_falls_back_for_weighted_calls_only(monkeypatch):
    """As on CUDA, here on the CPU: the kernel is declared to take no weight, so a weighted call
    runs F.cross_entropy, with one warning naming why, while unweighted calls keep the kernel.
    (Every row ignored tells the two apart: the kernel's mean is 0, F.cross_entropy's NaN.)"""
    monkeypatch.setitem(ops.KERNEL_LACKS, "cpu", {"xent_fwd": {"weight"}})
    monkeypatch.setattr(ops._state, "verdicts", {})
    monkeypatch.setattr(ops._state, "warned", set())
    z, t, w, _ = make(9, 4, torch.float32)
    with pytest.warns(RuntimeWarning, match=r"softmax_cross_entropy runs plain PyTorch on cpu \(torch.float32\): "
                                            "its cpu kernel takes no weight argument"):
        loss = ops.softmax_cross_entropy(z, t, weight=w, label_smoothing=0.1)
    assert torch.equal(loss, F.cross_entropy(z, t, weight=w, label_smoothing=0.1))
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: expected finite class weights >= 0, got weight\[2\] = -1$"):
        ops.softmax_cross_entropy(z, t, weight=torch.tensor([1.0, 2.0, -1.0, 0.5]))   # F.cross_entropy would take it
    everything_ignored = torch.full((9,), IGNORE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # once per (op, device, arguments): no second one
        assert ops.softmax_cross_entropy(z, everything_ignored, weight=w).isnan()        # F.cross_entropy
        assert ops.softmax_cross_entropy(z, everything_ignored).item() == 0.0            # the kernel


@pytest.mark.skipif(not (torch.cuda.is_available() and ops.extension_status()["cuda"]),
                    reason="needs a GPU and the CUDA kernels")
def test_weighted_on_cuda_runs_pytorch(monkeypatch):
    """The CUDA kernels take no class weights: the public op runs F.cross_entropy with one warning,
    and the raw op says so instead of ignoring them."""
    monkeypatch.setattr(ops._state, "warned", set())
    z, t, w, _ = (x.cuda() for x in make(37, 5, torch.float32))
    with pytest.warns(RuntimeWarning, match="its cuda kernel takes no weight argument"):
        loss = ops.softmax_cross_entropy(z, t, weight=w, label_smoothing=0.1, ignore_index=IGNORE)
    assert torch.equal(loss, F.cross_entropy(z, t, weight=w, label_smoothing=0.1, ignore_index=IGNORE))
    with pytest.raises(RuntimeError, match="per-class weights are not implemented in the CUDA kernels"):
        torch.ops.minift.xent_fwd(z, t, w, IGNORE, 0.0, 1)


# ------------------------------------------------------------------------------------------
# The heads' loss(..., weight=w)
# ------------------------------------------------------------------------------------------

def tiny_config(num_labels):
    return minift.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=16, num_labels=num_labels)


@pytest.mark.parametrize("impl", ["torch", "reference", "fused"])
def test_heads_loss_takes_class_weights(impl):
    """Sequence and token classification: loss(logits, labels, reduction, weight=w) is
    F.cross_entropy(weight=w) on the float32 logits, for a weight given in float64 or as a list
    (moved to the logits' dtype and device by the head)."""
    g = torch.Generator().manual_seed(5)
    w64 = torch.tensor([0.5, 3.0, 1.25], dtype=torch.float64)
    seq = minift.BertForSequenceClassification(tiny_config(3)).set_impl(impl)
    tok = minift.BertForTokenClassification(tiny_config(3)).set_impl(impl)
    logits, labels = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 1, 1, 0])
    tok_logits, tok_labels = torch.randn(2, 5, 3, generator=g), torch.tensor([[0, IGNORE, 2, 1, 1], [2, 2, IGNORE, 0, 1]])
    for reduction in ("mean", "sum"):
        for w in (w64, w64.tolist()):
            expect = F.cross_entropy(logits, labels, weight=w64.float(), reduction=reduction)
            torch.testing.assert_close(seq.loss(logits, labels, reduction, weight=w), expect, rtol=1e-6, atol=0)
            expect = F.cross_entropy(tok_logits.view(-1, 3), tok_labels.view(-1), weight=w64.float(), reduction=reduction)
            torch.testing.assert_close(tok.loss(tok_logits, tok_labels, reduction, weight=w), expect, rtol=1e-6, atol=0)
    bf = seq.loss(logits.bfloat16(), labels, weight=w64)              # bfloat16 logits: the loss in float32
    assert bf.dtype == torch.float32
    torch.testing.assert_close(bf, F.cross_entropy(logits.bfloat16().float(), labels, weight=w64.float()))


def test_heads_loss_refuses_bad_class_weights():
    seq = minift.BertForSequenceClassification(tiny_config(3))
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"weight: expected weight of shape \(C,\) = \(3,\), one per class, got \(2,\)"):
        seq.loss(logits, labels, weight=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"weight: expected finite class weights >= 0, got weight\[1\] = -2$"):
        seq.loss(logits, labels, weight=[1.0, -2.0, 1.0])               # refused on every impl, "torch" too
    with pytest.raises(ValueError, match="class weights apply to single-label classification, not to multi_label"):
        seq.loss(logits, torch.ones(4, 3), weight=torch.ones(3))
