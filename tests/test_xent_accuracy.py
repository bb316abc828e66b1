"""Accuracy of the CPU kernels against an extended-precision oracle, next to PyTorch's own error.

The rule (issue 15; design.md: "at most 2x the error of PyTorch's own same-dtype computation"):
for each case (a dtype, a row width C, a family of logits, a label smoothing, a reduction), the
compiled op and PyTorch's own op in the same dtype run on the same inputs, and each gets an error E
against the oracle:

- loss, reduction "none": the largest relative error over the rows, max_n |l_n - r_n| / |r_n|;
- loss, "mean"/"sum": the relative error of the scalar;
- gradient: each element's absolute error relative to the largest true magnitude among its row's
  terms, max_{n,c} |d_nc - g_nc| / (|w_n| max_c (p_nc + q_nc)), where g_nc = (p_nc - q_nc) w_n
  (softmax minus the smoothed one-hot, times the row's weight from the upstream gradient and the
  reduction). The terms and not their difference set the scale: where p_c and q_c nearly cancel
  (p_y = 1 - 1e-30 at the target of a confident row) no float algorithm keeps relative accuracy,
  and a row whose worst entry is such a difference would decide the case by luck.
A value whose true size is exactly 0 (an ignored row, a loss that underflows even the oracle) must
come out exactly 0: anything else counts as an infinite error, as NaN does.
The case passes when E(ours) <= 2 * max(E(torch), ulp), where ulp = torch.finfo(dtype).eps, one unit
in the last place of 1 in the input's dtype: the floor for cases where PyTorch's error is exactly 0
or below what the format resolves (an error under one ulp of the largest value is rounding).

The oracle computes softmax cross-entropy in numpy's long double (64-bit mantissa on x86-64, 2048x
finer than float64) to judge float64 inputs (where long double is plain double the float64 cases
skip), and in float64 for the other dtypes: its error there, about 1e-15 of a row's largest term,
is far below theirs, and numpy's float64 is several times faster than its long double. It uses the
exact identities that keep the small quantities accurate:
log s = log1p(r) with r = sum of e^{z_c - m} over all but one of the row's maxima, and at the target
p_y - 1 = expm1(log p_y). test_oracle_agrees_with_mpmath checks it against 50-digit arithmetic.

Each family is homogeneous (rows of one kind), so that the worst row of PyTorch does not hide the
kernel's errors on the others: logits drawn at scales 1e-3 to 20; shifted by +-M (M up to 1e30 in
float32/float64/bfloat16, 3e4 in float16) with O(1) gaps; rows of equal logits +-M; nearly equal
logits M (1 + k ulp); one entry +-M in a row of randn; confident rows whose other probabilities go
down to 1e-30. Every seventh row is ignored. Row widths cover the short-row walker (C <= 16, and
the backward's C <= 8) and the long-row one. The sweep runs on one thread (on a busy 2-core
machine two threads made it six times slower); test_thread_split_changes_nothing runs the same
rows, enough of them that at::parallel_for splits them, on one and on two threads and asks for
the same bits.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minift import ops

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="minift._C is not built")

EXT = np.longdouble
EXTENDED = np.finfo(EXT).eps < 1e-18
IGNORE = -100
CS = [2, 3, 9, 16, 17, 33, 1000, 30522]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture
def threads():
    """Sets torch's thread count for one test and restores it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------
# The oracle
# ------------------------------------------------------------------------------------------

def oracle_dtype(dtype):
    """The numpy type the oracle computes in for inputs of a torch dtype."""
    return EXT if dtype == torch.float64 else np.float64


def xent_oracle(z, t, eps, ignore_index=IGNORE, acc=EXT, w=None):
    """Per-row loss (N,), the gradient of each row's loss (N, C) and the row's scale of terms
    max_c (a p_c + q_c) (N,), in acc, long double by default (0 for ignored rows).

    z: float64 numpy logits (exactly the values the op sees), t: int64 targets, w: class weights
    (C,) or None (all 1). With q_c = (eps/C) w_c + (1 - eps) w_y [c = y] and a = sum_c q_c:
    l_n = -sum_c q_c log p_c,  dl_n/dz_c = a p_c - q_c  (without weights a = 1: p_c - q_c).
    """
    z, eps = z.astype(acc), acc(eps)
    N, C = z.shape
    w = np.ones(C, dtype=acc) if w is None else np.asarray(w, dtype=acc)
    rows = np.arange(N)
    keep = t != ignore_index
    y = np.where(keep, t, 0)
    d = z - z.max(1, keepdims=True)                                  # z_c - m <= 0
    tie = d == 0
    r = np.where(tie, 0, np.exp(d)).sum(1) + (tie.sum(1) - 1)        # s - 1: all but one e^0 = 1
    logp = d - np.log1p(r)[:, None]                                  # log p_c = z_c - m - log s
    q = np.broadcast_to(eps / C * w, (N, C)).copy()                  # (eps/C) w_c
    others = q.copy()
    others[rows, y] = 0
    q[rows, y] += (1 - eps) * w[y]                                   # + (1 - eps) w_y at the target
    loss = -(q * logp).sum(1)                                        # a sum of non-negative terms
    a = q.sum(1)
    p = np.exp(logp)
    grad = a[:, None] * p - q
    grad[rows, y] = a * np.expm1(logp[rows, y]) + others.sum(1)      # a p_y - q_y = a (p_y - 1) + sum_{c != y} q_c
    terms = a[:, None] * p + q
    return np.where(keep, loss, 0), np.where(keep[:, None], grad, 0), np.where(keep, terms.max(1), 0)


@pytest.mark.parametrize("acc,tol", [(np.float64, 1e-14), (EXT, 1e-17)], ids=["float64", "long double"])
def test_oracle_agrees_with_mpmath(acc, tol):
    """The oracle, in long double and in float64, against 50-digit arithmetic on rows of every kind."""
    mpmath = pytest.importorskip("mpmath")
    if acc == EXT and not EXTENDED:
        pytest.skip("numpy's long double is plain double here")
    mpmath.mp.dps = 50
    mp = lambda x: mpmath.mpf(np.format_float_scientific(x, precision=30, unique=False))
    rows = [[0.3, -1.2, 2.5], [1e30, 1e30, 1e30], [1e8, 1e8 + 8, 1e8 - 16], [0.0, -69.0, -70.5],
            [1e-3, -2e-3, 5e-4], [-1e30, 0.5, -0.25], [40.0, -3.0, 7.0]]
    z = np.array(rows, dtype=np.float64)
    for eps in (0.0, 0.1):
        for y in range(3):
            t = np.full(len(rows), y)
            loss, grad, _ = xent_oracle(z, t, eps, acc=acc)
            for n, row in enumerate(rows):
                zs = [mpmath.mpf(v) for v in row]
                lse = max(zs) + mpmath.log(mpmath.fsum(mpmath.exp(v - max(zs)) for v in zs))
                q = [mpmath.mpf(eps) / 3 + (1 - mpmath.mpf(eps)) * (c == y) for c in range(3)]
                exact = mpmath.fsum(-qc * (v - lse) for qc, v in zip(q, zs))
                assert abs(float((mp(loss[n]) - exact) / exact)) < tol, (row, eps, y)
                for c in range(3):
                    g = mpmath.exp(zs[c] - lse) - q[c]
                    scale = max(abs(mpmath.exp(v - lse) - qc) for v, qc in zip(zs, q))
                    assert abs(float((mp(grad[n, c]) - g) / scale)) < tol, (row, eps, y, c)


# ------------------------------------------------------------------------------------------
# The families of logits
# ------------------------------------------------------------------------------------------

def magnitudes(dtype):
    return [1e-3, 1.0, 1e3, 3e4] if dtype == torch.float16 else [1e-3, 1.0, 1e5, 1e8, 1e30]


def families(dtype, N, C, g):
    """(name, logits (N, C) float64, target (N,) or None for random targets)."""
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    ulp = torch.finfo(dtype).eps
    out = [(f"random x{s:g}", s * randn(N, C), None) for s in (1e-3, 1.0, 20.0)]
    for M in magnitudes(dtype):
        for sign in (1, -1):
            out.append((f"equal {sign * M:g}", torch.full((N, C), sign * M, dtype=torch.float64), None))
            if M >= 1:
                out.append((f"shifted {sign * M:g}", sign * M + 3 * randn(N, C), None))
            one = randn(N, C)
            where = torch.randint(0, C, (N,), generator=g)
            one[torch.arange(N), where] = sign * M
            target = torch.where(torch.arange(N) % 2 == 0, where, torch.randint(0, C, (N,), generator=g))
            out.append((f"one entry {sign * M:g}", one, target))
        k = torch.randint(-4, 5, (N, C), generator=g).to(torch.float64)
        out.append((f"nearly equal {M:g}", M * (1 + ulp * k), None))
    for gap in (10.0, 30.0, 69.0):                                   # other probabilities e^-69 = 1e-30
        z = randn(N, C)
        top = torch.randint(0, C, (N,), generator=g)
        z[torch.arange(N), top] += gap
        target = torch.where(torch.arange(N) % 2 == 0, top, torch.randint(0, C, (N,), generator=g))
        out.append((f"confident gap {gap:g}", z, target))
    return out


def rows_for(C):
    """Enough rows to split across two threads (the kernels' grain is about 2048 elements)."""
    return max(6, min(4096, 8192 // C))


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

def rel_err(x, ref, scale=None, acc=EXT):
    """max |x - ref| / scale, the scale |ref| elementwise unless given (broadcast against x), in acc.
    Where the scale is exactly 0, x must equal ref exactly."""
    x, ref = np.asarray(x, dtype=acc), np.asarray(ref, dtype=acc)
    diff = np.abs(x - ref)
    scale = np.abs(ref) if scale is None else np.broadcast_to(np.asarray(scale, dtype=acc), diff.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.where(scale > 0, diff / np.where(scale > 0, scale, 1), np.where(diff == 0, 0, np.inf))
    e = np.where(np.isnan(e), np.inf, e)
    return float(e.max())


def run_loss(fn, z, t, eps, reduction, up, weight=None):
    """loss and dlogits of fn on z, with upstream gradient up (per row for "none", else 1)."""
    zz = z.clone().requires_grad_()
    loss = fn(zz, t, ignore_index=IGNORE, label_smoothing=eps, reduction=reduction, weight=weight)
    (dz,) = torch.autograd.grad(loss, zz, up.to(loss.dtype) if reduction == "none" else None)
    return loss.detach().double().numpy(), dz.double().numpy()


def xent_cases(dtype, C, seed=0, weighted=False):
    """Every (family, smoothing, reduction) case of one dtype and width: a list of
    (case name, quantity, E(ours), E(torch)). weighted: with class weights, irregular in
    [1/8, 4] and one of them 0, exact in every dtype."""
    g = torch.Generator().manual_seed(seed * 1000 + C)
    N = rows_for(C)
    acc = oracle_dtype(dtype)
    weight, w_np = None, None
    if weighted:
        weight = torch.randint(1, 33, (C,), generator=g).double() / 8
        weight[C // 2] = 0
        w_np, weight = weight.numpy(), weight.to(dtype)
    records = []
    for name, z64, target in families(dtype, N, C, g):
        z = z64.to(dtype)
        t = target.clone() if target is not None else torch.randint(0, C, (N,), generator=g)
        t[3::7] = IGNORE
        zq = z.double().numpy()                                      # the values the ops see
        up = torch.randint(4, 17, (N,), generator=g).double() / 8    # 0.5 .. 2, exact in every dtype
        keep = (t != IGNORE).numpy()
        for eps in (0.0, 0.1):
            loss_rows, grad_rows, terms = xent_oracle(zq, t.numpy(), eps, acc=acc, w=w_np)
            # the mean's divisor: the kept rows, or the sum of their targets' class weights
            kept = keep.sum() if w_np is None else w_np[t.numpy()[keep]].astype(acc).sum()
            for reduction in ("none", "mean", "sum"):
                if reduction == "none":
                    w = up.numpy().astype(acc)                       # (N,) row weights
                    ref_loss = loss_rows
                else:
                    w = np.full(N, acc(1) / kept if reduction == "mean" else acc(1))
                    ref_loss = loss_rows.sum() * w[0]
                ref_grad, scale = grad_rows * w[:, None], (terms * w)[:, None]
                errs = {}
                for who, fn in (("ours", ops.softmax_cross_entropy), ("torch", F.cross_entropy)):
                    loss, dz = run_loss(fn, z, t, eps, reduction, up, weight)
                    errs[who] = (rel_err(loss, ref_loss, acc=acc), rel_err(dz, ref_grad, scale, acc=acc))
                case = f"{name}, smoothing {eps:g}, {reduction}"
                records.append((case, "loss", errs["ours"][0], errs["torch"][0]))
                records.append((case, "grad", errs["ours"][1], errs["torch"][1]))
    return records


def failures(records, dtype):
    ulp = torch.finfo(dtype).eps
    return [f"{case}: {what} error {ours:.3g} vs PyTorch's {theirs:.3g} (bound {2 * max(theirs, ulp):.3g})"
            for case, what, ours, theirs in records if not ours <= 2 * max(theirs, ulp)]


# Every dtype at every width but float64 at 30,522: float64 (the gradcheck dtype, not a training
# one) takes the same long-row code at C = 1000 and costs most there, its oracle being long double.
SWEEP = [(dtype, C) for dtype in DTYPES for C in CS if not (dtype == torch.float64 and C > 1000)]


@pytest.mark.parametrize("dtype,C", SWEEP, ids=[f"{d}-{C}" for d, C in SWEEP])
def test_cross_entropy_within_2x_torch(dtype, C, threads):
    if dtype == torch.float64 and not EXTENDED:
        pytest.skip("float64 needs an oracle finer than float64: numpy's long double is plain double here")
    threads(1)
    bad = failures(xent_cases(dtype, C), dtype)
    assert not bad, f"{len(bad)} cases outside 2x PyTorch's error:\n" + "\n".join(bad[:40])


# float16 left out: PyTorch's own float16 error is too large to bind (the unweighted sweep has it)
WEIGHTED_SWEEP = [(dtype, C) for dtype in (torch.float32, torch.float64, torch.bfloat16) for C in (2, 33, 1000)]


@pytest.mark.parametrize("dtype,C", WEIGHTED_SWEEP, ids=[f"{d}-{C}" for d, C in WEIGHTED_SWEEP])
def test_weighted_cross_entropy_within_2x_torch(dtype, C, threads):
    """The same sweep with class weights (F.cross_entropy's weight=, issue 17): C = 2 takes the
    short-row walkers, 33 and 1000 the long ones. At C = 33 a target weighted 0 has p_y near 1/33,
    where a_n (p_y - 1) + t_n would cancel five bits (without the kernel's p_y <= 1/2 branch this
    fails in float32 and float64)."""
    if dtype == torch.float64 and not EXTENDED:
        pytest.skip("float64 needs an oracle finer than float64: numpy's long double is plain double here")
    threads(1)
    bad = failures(xent_cases(dtype, C, weighted=True), dtype)
    assert not bad, f"{len(bad)} cases outside 2x PyTorch's error:\n" + "\n".join(bad[:40])


@pytest.mark.parametrize("C", CS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_thread_split_changes_nothing(dtype, C, threads):
    """Each row's loss and gradient depend on that row alone, whichever thread and block it lands
    in: rows of every family, split across two threads, give the bits of one thread."""
    g = torch.Generator().manual_seed(C)
    N = rows_for(C)
    z = torch.cat([f[1][: max(1, N // 8)] for f in families(dtype, N, C, g)]).to(dtype)
    t = torch.randint(0, C, (z.shape[0],), generator=g)
    t[3::7] = IGNORE
    up = torch.rand(z.shape[0], generator=g)
    results = []
    for n_threads in (1, 2):
        threads(n_threads)
        for reduction in ("none", "mean"):
            zz = z.clone().requires_grad_()
            loss = ops.softmax_cross_entropy(zz, t, label_smoothing=0.1, reduction=reduction)
            (dz,) = torch.autograd.grad(loss, zz, up.to(loss.dtype) if reduction == "none" else None)
            results.append((loss, dz))
    assert z.shape[0] * C >= 2 * 2048, "too few rows to split"
    for (l1, d1), (l2, d2) in zip(results[:2], results[2:]):
        assert torch.equal(l1, l2) and torch.equal(d1, d2)


@pytest.mark.parametrize("magnitude", [1e5, 1e8, 1e30])
def test_equal_large_logits_give_log_c(magnitude):
    """The issue's example: three equal logits have loss log 3 and gradient (1/3 - 1, 1/3, 1/3)
    at every magnitude."""
    z = torch.full((1, 3), magnitude, requires_grad=True)
    loss = ops.softmax_cross_entropy(z, torch.tensor([0]))
    (dz,) = torch.autograd.grad(loss, z)
    assert abs(loss.item() - math.log(3)) <= 2 * torch.finfo(torch.float32).eps * math.log(3)
    expect = torch.tensor([[1 / 3 - 1, 1 / 3, 1 / 3]], dtype=torch.float64)
    assert (dz.double() - expect).abs().max() <= 2 * torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------------
# Fused attention, the same rule
# ------------------------------------------------------------------------------------------

def attention_oracle(q, k, v, keep, scale, dout):
    """O = softmax(q k^T scale + mask) v in float64 (0 for a query with no kept key), its gradients
    for the upstream dout, and for each the scale of the terms it adds up: the formulas of the
    forward and backward with every term made positive (dS_ij = P_ij (dP_ij - D_i), dP_ij = dout_i .
    v_j, D_i = dout_i . o_i), as in the textbook bound |fl(x.y) - x.y| <= n u |x|.|y|:
    out: max_d sum_j P_ij |v_jd| per query row; dq: scale |dS| |k|; dk: scale |dS|^T |q|;
    dv: P^T |dout|, with |dS|_ij = P_ij (|dout_i|.|v_j| + |dout_i|.|o_i|), the last three as their
    largest value per (batch, head) slice."""
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    s = (q @ k.transpose(-2, -1)) * scale                            # (B, H, T, T)
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    any_kept = keep.any(-1)[:, None, None, None]                     # (B, 1, 1, 1)
    p = torch.softmax(s.masked_fill(~any_kept, 0.0), -1) * any_kept
    out = p @ v
    grads = torch.autograd.grad(out, (q, k, v), dout.double())
    with torch.no_grad():
        do = dout.double().abs()
        ds_terms = p * (do @ v.abs().transpose(-2, -1) + (do * out.abs()).sum(-1, keepdim=True))  # (B, H, T, T)
        slice_max = lambda x: x.amax((-2, -1), keepdim=True)
        terms = ((p @ v.abs()).amax(-1, keepdim=True),
                 slice_max(scale * ds_terms @ k.abs()), slice_max(scale * ds_terms.transpose(-2, -1) @ q.abs()),
                 slice_max(p.transpose(-2, -1) @ dout.double().abs()))
    return (out.detach(), *grads), terms


def attention_mask(B, T, g):
    """Irregular key lengths; batch element 0 keeps no key at all (every query row of it is empty)."""
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = 0
    return torch.arange(T)[None, :] < lengths[:, None]


def attention_cases(dtype, T, D, seed=0):
    """(case, quantity, E(ours), E(torch)) for fused_attention and SDPA on the same inputs."""
    B, H = 2, 3
    g = torch.Generator().manual_seed(seed * 1000 + T * 100 + D)
    keep = attention_mask(B, T, g)
    records = []
    for sharpness in (1.0, 4.0):                                     # 4: peaked softmax rows
        q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
        q, k, v = (x.to(dtype) for x in (q * sharpness, k, v))       # the inputs both ops see
        dout = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(dtype)
        scale = D ** -0.5
        refs, terms = attention_oracle(q, k, v, keep, scale, dout)
        errs = {}
        for who in ("ours", "torch"):
            ins = [x.clone().requires_grad_() for x in (q, k, v)]
            if who == "ours":
                out = ops.fused_attention(*ins, keep, scale=scale)
            else:
                out = F.scaled_dot_product_attention(*ins, attn_mask=keep[:, None, None, :], scale=scale)
            got = [out] + (list(torch.autograd.grad(out, ins, dout)) if dtype == torch.float32 else [])
            errs[who] = [rel_err(x.detach().double().numpy(), r.numpy(), t.numpy())
                         for x, r, t in zip(got, refs, terms)]
        for what, ours, theirs in zip(("out", "dq", "dk", "dv"), errs["ours"], errs["torch"]):
            records.append((f"T={T} D={D} sharpness {sharpness:g}", what, ours, theirs))
    return records


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [32, 64, 48])
@pytest.mark.parametrize("T", [1, 7, 65, 130])
def test_attention_within_2x_torch(dtype, T, D, threads):
    """Outputs (all dtypes) and, for float32, dq/dk/dv of minift.ops.fused_attention against a
    float64 oracle, next to F.scaled_dot_product_attention in the same dtype (B = 2, H = 3, a
    key-padding mask with irregular lengths and one batch element that keeps no key). The error of
    each element is relative to the scale of the terms it sums (attention_oracle): per query row for
    the output, per (batch, head) slice for the gradients (at T = 1 the true dq and dk are exactly
    0, a cancellation that no float computation reproduces). Where that scale is 0 (the batch
    element with no kept key) the result must be exactly 0. Pass: E(ours) <= 2 max(E(torch), ulp)."""
    threads(1)
    bad = failures(attention_cases(dtype, T, D), dtype)
    assert not bad, "\n".join(bad)
