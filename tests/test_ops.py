"""The compiled kernels (minift._C) against the hand-derived reference and PyTorch, on the CPU
(and on CUDA when there is a GPU: the same tests, parametrised by device)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import minift
from minift import functional as RF
from minift import ops

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="minift._C is not built")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.extension_status()["cuda"] else [])


def rnd(*shape, seed=0, dtype=torch.float64, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def padding_mask(B, T, seed=0, device="cpu"):
    """Irregular lengths, batch row 0 fully masked (every query row of it sees no key)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = 0
    return (torch.arange(T)[None, :] < lengths[:, None]).to(device)


SHAPES = [(2, 3, 13, 32), (3, 2, 17, 64), (2, 2, 9, 128), (2, 3, 11, 48), (1, 1, 1, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,H,T,D", SHAPES)
def test_attention_fp32_equals_reference(device, B, H, T, D):
    q, k, v = (rnd(B, H, T, D, seed=s, dtype=torch.float32, device=device).requires_grad_() for s in range(3))
    mask = padding_mask(B, T, device=device) if B > 1 else None
    out = ops.fused_attention(q, k, v, mask)
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref = RF.attention(*ref_in, None if mask is None else mask.cpu())
    assert (out.detach().double().cpu() - ref).abs().max() <= 1e-6
    if mask is not None:
        assert (out[0] == 0).all(), "fully masked rows give 0"
    dout = rnd(B, H, T, D, seed=7, dtype=torch.float32, device=device)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double().cpu())
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert (g.double().cpu() - r).abs().max() <= 1e-5 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("D", [32, 48, 64, 128])
def test_attention_gradcheck_float64(D):
    B, H, T = 2, 2, 7
    q, k, v = (rnd(B, H, T, D, seed=s).requires_grad_() for s in range(3))
    mask = padding_mask(B, T)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.fused_attention(q, k, v, mask), (q, k, v),
                                    eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_attention_gradcheck_with_dropout_fixed_seed():
    B, H, T, D = 2, 2, 6, 32
    q, k, v = (rnd(B, H, T, D, seed=s).requires_grad_() for s in range(3))
    mask = padding_mask(B, T)
    fn = lambda q, k, v: ops.attention_with_lse(q, k, v, mask, dropout_p=0.3, seed=1234, offset=5)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cpu", torch.float64)]
                         + [(d, torch.float32) for d in DEVICES if d != "cpu"])
def test_fused_dropout_uses_the_philox_stream(device, dtype):
    """y = x keep / (1-p) with keep = element n of the stream (seed, 0), the CPU's mask on any
    device; the gradient is masked alike."""
    p = 0.3
    x = rnd(5, 7, 9, seed=4, dtype=dtype, device=device).requires_grad_()
    torch.manual_seed(123)
    y = ops.fused_dropout(x, p)
    torch.manual_seed(123)
    seed = ops._seed(p, None)                                   # the seed the call above drew
    keep = ops.dropout_mask(1, 1, 1, x.numel(), p, seed=seed).reshape(x.shape).to(device)
    zero = torch.zeros((), dtype=dtype, device=device)
    torch.testing.assert_close(y.detach(), torch.where(keep, x.detach() / (1 - p), zero))
    assert torch.equal(y.detach() != 0, keep)
    dy = rnd(5, 7, 9, seed=5, dtype=dtype, device=device)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx, torch.where(keep, dy / (1 - p), zero))
    assert abs(keep.float().mean().item() - (1 - p)) < 0.06
    big = ops.fused_dropout(torch.ones(200_000), 0.1)
    assert abs((big != 0).float().mean().item() - 0.9) < 0.003
    assert ops.fused_dropout(x, p, training=False) is x and ops.fused_dropout(x, 0.0) is x
    torch.library.opcheck(torch.ops.minift.dropout_fwd.default, (x.detach(), p, 7, 0))


def holes_mask(B, T, seed=11):
    """Keys kept at random (about 60%), row 0 with none, row 1 left-padded: masks whose kept keys
    are not a prefix, which the CPU kernel gathers instead of reading in place."""
    keep = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.6
    keep[0] = False
    keep[1] = torch.arange(T) >= T // 3
    return keep


@pytest.mark.parametrize("mask_kind", ["right-padded", "holes"])
def test_dropout_matches_its_mask_and_reference(mask_kind):
    B, H, T, D, p = 4, 2, 10, 32, 0.25
    q, k, v = (rnd(B, H, T, D, seed=s).requires_grad_() for s in range(3))
    mask = padding_mask(B, T) if mask_kind == "right-padded" else holes_mask(B, T)
    keep = ops.dropout_mask(B, H, T, T, p, seed=99, offset=3)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.05
    out = ops.attention_with_lse(q, k, v, mask, dropout_p=p, seed=99, offset=3)[0]
    ref = RF.attention_forward(q, k, v, mask, D ** -0.5, keep, p)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    dO = rnd(B, H, T, D, seed=5)
    ours = torch.autograd.grad(out, (q, k, v), dO)
    theirs = RF.attention_backward(dO, q, k, v, mask, D ** -0.5, keep, p)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    other = ops.dropout_mask(B, H, T, T, p, seed=99, offset=4)
    assert not torch.equal(keep, other), "another offset gives other bits"


@pytest.mark.parametrize("mask_kind", ["right-padded", "holes"])
def test_attention_reads_and_writes_the_projection_layout(mask_kind):
    """On the CPU the kernels take q, k, v as the projections' output (B, T, H*D) viewed per head,
    at its strides, write O in that order (so O.transpose(1, 2).reshape(B, T, H*D) is free), take dO
    in it and give dQ, dK, dV in it: no copy in either pass, and the result of contiguous inputs."""
    from torch.profiler import ProfilerActivity, profile
    B, T, H, D, p = 4, 10, 3, 16, 0.2
    mask = padding_mask(B, T) if mask_kind == "right-padded" else holes_mask(B, T)
    proj = [rnd(B, T, H * D, seed=s, dtype=torch.float32).requires_grad_() for s in range(3)]
    dy = rnd(B, T, H * D, seed=9, dtype=torch.float32)

    def run(contiguous):
        heads = [x.view(B, T, H, D).transpose(1, 2) for x in proj]             # (B, H, T, D) views
        if contiguous:
            heads = [h.contiguous() for h in heads]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            o = ops.fused_attention(*heads, mask, dropout_p=p, generator=torch.Generator().manual_seed(5))
            y = o.transpose(1, 2).reshape(B, T, H * D)
            grads = torch.autograd.grad(y, proj, dy)
        copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone")]
        return o, y, grads, copies, heads[0]

    o, y, grads, copies, q = run(contiguous=False)
    assert o.stride() == q.stride() == (T * H * D, D, H * D, 1)
    assert not copies, f"the strided path copied: {copies}"
    o_ref, y_ref, grads_ref, copies_ref, _ = run(contiguous=True)
    assert copies_ref, "the contiguous inputs' path copies (the check above can see copies)"
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)
    ref = RF.attention(*[x.detach().double().view(B, T, H, D).transpose(1, 2) for x in proj], mask)
    no_drop = ops.fused_attention(*[x.view(B, T, H, D).transpose(1, 2) for x in proj], mask)
    assert (no_drop.double() - ref).abs().max() <= 1e-6


def test_philox_known_answer():
    """The Random123 known-answer vector for Philox4x32-10 (counter = key = 0): the first four
    elements of stream (seed 0, offset 0) are its four words; keep <=> bits >= p * 2^32."""
    words = [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    for p in (0.2, 0.5, 0.8):
        expected = torch.tensor([w >= int(p * 2 ** 32) for w in words])
        assert torch.equal(ops.dropout_mask(1, 1, 1, 4, p, seed=0, offset=0).flatten(), expected)


def numpy_philox_bits(seed: int, offset: int, n: "np.ndarray") -> "np.ndarray":
    """Philox4x32-10 written again in NumPy, one block per element: the 32 random bits of elements n
    of the stream (seed, offset) (element n is word n % 4 of the block with counter (n // 4, offset)
    and key seed). The oracle for the kernels' vectorised generator."""
    import numpy as np
    seed, offset = seed % 2 ** 64, offset % 2 ** 64              # the kernels read both as uint64
    n = np.asarray(n, dtype=np.uint64)
    block, lane = n >> np.uint64(2), (n & np.uint64(3)).astype(np.int64)
    m32 = np.uint64(0xFFFFFFFF)
    c = [block & m32, block >> np.uint64(32), np.full_like(n, offset & 0xFFFFFFFF), np.full_like(n, offset >> 32)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]        # exact: both < 2^32
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & m32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & m32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return np.stack(c, 1)[np.arange(len(n)), lane]


@pytest.mark.parametrize("seed,offset", [(0, 0), (1234567, 3), (-987654321, 2 ** 40 + 77)])   # int64: -x is 2^64 - x
def test_philox_stream_against_numpy(seed, offset):
    """The bits the kernels draw, through the keep masks at several thresholds (keep <=> bits >=
    threshold), against the NumPy Philox: short runs (one or two blocks), long ones (sixteen blocks
    a pass, the chunks of 256), and, through add_layer_norm's rows of 45, runs that start and end
    inside a block. (The carry of the block counter into its high word needs 2^34 elements: not
    reachable from here.)"""
    import numpy as np

    def threshold(p):                             # philox.h's dropout_threshold: p as float32, times 2^32
        return min(int(float(np.float32(p)) * 2 ** 32), 2 ** 32 - 1)
    for B, H, Tq, Tk in ((1, 1, 1, 3), (1, 1, 1, 7), (1, 2, 3, 37), (3, 2, 50, 129)):
        bits = numpy_philox_bits(seed, offset, np.arange(B * H * Tq * Tk)).reshape(B, H, Tq, Tk)
        for p in (0.1, 0.5, 0.9, 0.37):
            mask = torch.ops.minift.dropout_mask(torch.empty(0), B, H, Tq, Tk, p, seed, offset).numpy()
            assert np.array_equal(mask, bits >= threshold(p)), (B, H, Tq, Tk, p)
    x = torch.ones(3, 37, 45)                     # add_layer_norm's rows of 45: every row starts off a block
    bits = numpy_philox_bits(seed, offset, np.arange(x.numel())).reshape(x.shape)
    for p in np.linspace(0.01, 0.99, 12):
        keep = torch.ops.minift.add_layer_norm_fwd(x, x, torch.ones(45), torch.zeros(45), 1e-5, float(p), seed,
                                                   offset)[4].numpy()
        assert np.array_equal(keep, bits >= threshold(p)), p


# On a GPU, T = 150 spans three 64-key tiles of the tensor-core forward with a partial last one.
LOW_PRECISION_CASES = [("cpu", 19, 64)] + [(d, 150, D) for d in DEVICES if d != "cpu" for D in (32, 64, 128)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device,T,D", LOW_PRECISION_CASES)
def test_attention_low_precision_within_2x_torch(device, T, D, dtype):
    """Output and gradients in float16/bfloat16 against float64: at most twice the error of the same
    attention written in PyTorch ops in that dtype on the same device."""
    B, H = 2, 3
    q, k, v = (rnd(B, H, T, D, seed=s) for s in range(3))
    mask = padding_mask(B, T)
    dout = rnd(B, H, T, D, seed=7)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = RF.attention(*ref_in, mask)
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    results = {}
    for name, fn in (("ours", ops.fused_attention), ("torch", RF.attention)):
        low = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*low, mask.to(device))
        grads = torch.autograd.grad(out, low, dout.to(device=device, dtype=dtype))
        results[name] = [out.detach().double().cpu()] + [g.double().cpu() for g in grads]
    for i, want in enumerate([ref.detach(), *ref_grads]):
        err = (results["ours"][i] - want).abs().max().item()
        base = (results["torch"][i] - want).abs().max().item()
        assert err <= 2 * base, (["out", "dq", "dk", "dv"][i], err, base)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype,D", [(torch.float32, 48), (torch.bfloat16, 64)])
def test_attention_dropout_mask_is_the_cpus_on_cuda(dtype, D):
    """dropout_mask on the GPU equals the CPU's bit for bit, and attention with dropout on the GPU
    (version 1 in float32, the tensor-core forward in bfloat16) applies exactly that mask."""
    B, H, T, p = 2, 3, 70, 0.2
    keep = ops.dropout_mask(B, H, T, T, p, seed=11, offset=2)
    assert torch.equal(ops.dropout_mask(B, H, T, T, p, seed=11, offset=2, device="cuda").cpu(), keep)
    q, k, v = (rnd(B, H, T, D, seed=s) for s in range(3))
    mask = padding_mask(B, T)
    ref = RF.attention_forward(q, k, v, mask, D ** -0.5, keep, p)
    low = [t.to("cuda", dtype) for t in (q, k, v)]
    ours = ops.attention_with_lse(*low, mask.cuda(), dropout_p=p, seed=11, offset=2)[0].double().cpu()
    theirs = RF.attention_forward(*low, mask.cuda(), D ** -0.5, keep.cuda(), p).double().cpu()
    assert (ours - ref).abs().max() <= 2 * (theirs - ref).abs().max() + 1e-6


# On the GPU with D = 32/64/128, float32 takes attention_rows.cu (keys, or queries in the dK/dV pass,
# in tiles of 4096 / D rows) and float16/bfloat16 the tensor-core kernels of attention_v3.cu (tiles of
# 64 rows, 16 per warp): these lengths span several tiles with a partial last one; Tq != Tk too.
ROWS_CASES = [(2, 3, 150, 150, 64), (1, 2, 37, 200, 32), (2, 2, 70, 45, 128), (3, 1, 129, 129, 64)]


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("B,H,Tq,Tk,D", ROWS_CASES)
def test_attention_cuda_kernels_within_2x_torch(B, H, Tq, Tk, D, p, dtype):
    """Output and gradients of the CUDA attention against float64 with the same dropout mask, at most
    twice the error of the same attention in PyTorch ops in that dtype on the GPU; batch row 0 has
    every key masked (its output and gradients are 0)."""
    g = torch.Generator().manual_seed(B * 1000 + Tq + Tk + D)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, Tk, D, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, Tk + 1, (B,), generator=g)
    lengths[0] = 0
    mask = torch.arange(Tk)[None] < lengths[:, None]
    keep = ops.dropout_mask(B, H, Tq, Tk, p, seed=5, offset=3) if p > 0 else None
    scale = D ** -0.5
    results = {}
    for name, device, dt in (("ref", "cpu", torch.float64), ("ours", "cuda", dtype), ("torch", "cuda", dtype)):
        x = [t.to(device, dt).requires_grad_() for t in (q, k, v)]
        if name == "ours":
            out = ops.attention_with_lse(*x, mask.cuda(), dropout_p=p, seed=5, offset=3)[0]
        else:
            out = RF.attention_forward(*x, mask.to(device), scale, None if keep is None else keep.to(device), p)
        grads = torch.autograd.grad(out, x, dout.to(device, dt))
        results[name] = [out.detach().double().cpu()] + [t.double().cpu() for t in grads]
    assert (results["ours"][0][0] == 0).all() and (results["ours"][2][0] == 0).all()
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        want = results["ref"][i]
        err = (results["ours"][i] - want).abs().max().item()
        base = (results["torch"][i] - want).abs().max().item()
        assert err <= 2 * base + 1e-7, (name, err, base)


# C <= 16 goes through the CPU's short-row walker (C <= 8 in the backward), longer rows one by one;
# N = 1500 splits the rows across threads. On CUDA, C <= 1024 takes a warp per row and longer rows
# a block; C = 2051 starts most rows off a 16-byte boundary (a scalar head before the vectors).
XENT_SHAPES = [(37, 29), (41, 2), (23, 9), (19, 16), (19, 17), (1500, 3), (6, 2051)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("N,C", XENT_SHAPES)
def test_cross_entropy_fp32_equals_reference(device, reduction, smoothing, N, C):
    z = rnd(N, C, dtype=torch.float32, device=device, scale=3.0).requires_grad_()
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, C, (N,), generator=g)
    t[::5] = -100
    t = t.to(device)
    ours = ops.softmax_cross_entropy(z, t, label_smoothing=smoothing, reduction=reduction)
    zr = z.detach().double().cpu().requires_grad_()
    ref = RF.cross_entropy(zr, t.cpu(), label_smoothing=smoothing, reduction=reduction)
    assert (ours.double().cpu() - ref).abs().max() <= 1e-6 * max(1.0, ref.abs().max().item())
    up = torch.rand(ours.shape, generator=g, dtype=torch.float64)
    (dz,) = torch.autograd.grad(ours, z, up.to(device=device, dtype=ours.dtype))
    (dzr,) = torch.autograd.grad(ref, zr, up)
    assert (dz.double().cpu() - dzr).abs().max() <= 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_gradcheck_float64(reduction):
    z = rnd(6, 5, scale=2.0).requires_grad_()
    t = torch.tensor([0, 4, -100, 2, 1, 3])
    assert torch.autograd.gradcheck(
        lambda z: ops.softmax_cross_entropy(z, t, label_smoothing=0.1, reduction=reduction), (z,))


def test_cross_entropy_all_ignored_and_huge_logits():
    z = rnd(4, 7).requires_grad_()
    loss = ops.softmax_cross_entropy(z, torch.full((4,), -100))
    assert loss.item() == 0.0
    assert (torch.autograd.grad(loss, z)[0] == 0).all()
    big = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3]], requires_grad=True)
    t = torch.tensor([1, 1])
    loss = ops.softmax_cross_entropy(big, t, label_smoothing=0.1)
    ref = F.cross_entropy(big.double(), t, label_smoothing=0.1)
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= 1e-3 * ref.item()
    assert torch.isfinite(torch.autograd.grad(loss, big)[0]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C", [300, 2051])
def test_cross_entropy_low_precision_within_2x_torch(device, dtype, C):
    z = rnd(64, C, scale=4.0)
    t = torch.randint(0, C, (64,), generator=torch.Generator().manual_seed(3))
    ref = F.cross_entropy(z, t, reduction="none")
    zl, tl = z.to(device=device, dtype=dtype), t.to(device)
    ours = ops.softmax_cross_entropy(zl, tl, reduction="none").double().cpu()
    theirs = F.cross_entropy(zl, tl, reduction="none").double().cpu()
    assert (ours - ref).abs().max() <= 2 * (theirs - ref).abs().max() + 1e-6
    # the gradient, against float64, next to PyTorch's own in the same dtype
    zr = z.clone().requires_grad_()
    (dref,) = torch.autograd.grad(F.cross_entropy(zr, t), zr)
    zo, zt = zl.clone().requires_grad_(), zl.clone().requires_grad_()
    (dours,) = torch.autograd.grad(ops.softmax_cross_entropy(zo, tl), zo)
    (dtheirs,) = torch.autograd.grad(F.cross_entropy(zt, tl), zt)
    err, base = (dours.double().cpu() - dref).abs().max(), (dtheirs.double().cpu() - dref).abs().max()
    assert err <= 2 * base + 1e-7, (err, base)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [2, 1000, 2051, 30522, 40000])
def test_cross_entropy_one_pass_on_cuda(dtype, C):
    """On CUDA, a mean loss whose logits need a gradient is computed with its gradient in one read of
    the logits when a warp holds the row (up to 1024 classes; longer rows take the two passes, inside
    the same op when it is called directly). The
    gradient handed to backward with g = 1 (kept), with g != 1 (recomputed), and from a second
    backward of the same graph (computed afresh): each against float64, at most 2x the error of
    F.cross_entropy in the same dtype. The sum (two passes) is held to the same."""
    N = 48
    g = torch.Generator().manual_seed(C)
    z = torch.randn(N, C, generator=g, dtype=torch.float64) * 4
    t = torch.randint(0, C, (N,), generator=g)
    t[::7] = -100
    z_low, t_cuda = z.to("cuda", dtype), t.cuda()
    for reduction, eps in (("mean", 0.0), ("sum", 0.1)):
        zr = z_low.double().cpu().requires_grad_()
        ref = F.cross_entropy(zr, t, reduction=reduction, label_smoothing=eps)
        (dref,) = torch.autograd.grad(ref, zr)
        zt = z_low.clone().requires_grad_()
        (dtorch,) = torch.autograd.grad(F.cross_entropy(zt, t_cuda, reduction=reduction, label_smoothing=eps), zt)
        base = (dtorch.double().cpu() - dref).abs().max().item()

        def check(dz, scale):           # slack: half an ulp of the largest gradient, in float32
            err = (dz.double().cpu() - scale * dref).abs().max().item()
            assert err <= 2 * scale * base + 2 ** -24 * scale * dref.abs().max().item(), (reduction, scale, err, base)

        zo = z_low.clone().requires_grad_()
        loss = ops.softmax_cross_entropy(zo, t_cuda, reduction=reduction, label_smoothing=eps)
        assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item())) * (1 if dtype == torch.float32 else 100)
        loss.backward(retain_graph=True)                                       # g = 1: the forward's dz
        check(zo.grad, 1.0)
        first = zo.grad.clone()
        (again,) = torch.autograd.grad(loss, zo, torch.tensor(0.37, device="cuda"))   # a second backward
        check(again, 0.37)
        assert torch.equal(zo.grad, first)                                       # the first is untouched
        zo2 = z_low.clone().requires_grad_()
        (ops.softmax_cross_entropy(zo2, t_cuda, reduction=reduction, label_smoothing=eps) * 0.37).backward()
        check(zo2.grad, 0.37)                                                    # g != 1: recomputed


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("needs_grad", [False, True])
def test_cross_entropy_bad_target_stops_the_cuda_kernel(needs_grad):
    """On the GPU the targets are checked inside the kernel, which stops with a message (the two-pass
    forward, and the one-pass forward a mean with a gradient wanted takes); the CUDA context is then
    unusable, so this runs in its own process."""
    code = (f"import torch; from minift import ops; z = torch.randn(4, 5, device='cuda', requires_grad={needs_grad}); "
            "t = torch.tensor([0, 1, 9, 2], device='cuda'); ops.softmax_cross_entropy(z, t); torch.cuda.synchronize()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "expected targets in [0, 5) or ignore_index -100, got 9 at row 2" in r.stdout + r.stderr


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_one_pass_cross_entropy_ops_refuse_what_they_do_not_do():
    """The one-pass ops (CUDA only) take the mean or the sum, and write into a dz shaped like the
    logits; anything else is refused with a message, and the dz passed in is left as it was."""
    z = torch.randn(6, 5, device="cuda")
    t = torch.tensor([0, 1, 2, 3, 4, 0], device="cuda")
    with pytest.raises(RuntimeError, match="xent_fwd_grad: expected reduction mean or sum, got none"):
        torch.ops.minift.xent_fwd_grad(z, t, -100, 0.0, 0)
    loss, stats, dz = torch.ops.minift.xent_fwd_grad(z, t, -100, 0.0, 1)
    kept = dz.clone()
    one = torch.ones((), device="cuda")
    with pytest.raises(RuntimeError, match="xent_bwd_into: expected reduction mean or sum, got none"):
        torch.ops.minift.xent_bwd_into(dz, torch.ones(6, device="cuda"), z, t, stats, -100, 0.0, 0)
    with pytest.raises(RuntimeError, match="softmax_cross_entropy backward dz: expected shape"):
        torch.ops.minift.xent_bwd_into(dz[:, :4].contiguous(), one, z, t, stats, -100, 0.0, 1)
    assert torch.equal(dz, kept)
    assert torch.equal(torch.ops.minift.xent_bwd_into(dz, one, z, t, stats, -100, 0.0, 1), kept)   # g = 1: kept


@pytest.mark.parametrize("mask_kind", ["right-padded", "holes"])
@pytest.mark.parametrize("device", DEVICES)
def test_every_output_element_is_written(device, mask_kind, monkeypatch):
    """MINIFT_POISON_OUTPUTS=1 makes the ops fill their outputs with NaN before the kernel runs:
    an element a kernel forgets to write then shows as NaN. Masked keys hold 1e30 and NaN values
    that must never be read."""
    monkeypatch.setenv("MINIFT_POISON_OUTPUTS", "1")
    B, H, T, D = 4, 2, 9, 48
    q, k, v = (rnd(B, H, T, D, seed=s, dtype=torch.float32, device=device).requires_grad_() for s in range(3))
    mask = holes_mask(B, T).to(device) if mask_kind == "holes" else padding_mask(B, T, device=device)
    with torch.no_grad():
        k.masked_fill_(~mask[:, None, :, None], 1e30)
        v.masked_fill_(~mask[:, None, :, None], float("nan"))
    out = ops.fused_attention(q, k, v, mask)
    assert torch.isfinite(out).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    z = rnd(7, 11, dtype=torch.float32, device=device).requires_grad_()
    t = torch.tensor([1, -100, 3, 0, 10, -100, 2], device=device)
    rows = ops.softmax_cross_entropy(z, t, reduction="none")
    (dz,) = torch.autograd.grad(rows.sum(), z)
    assert torch.isfinite(rows).all() and torch.isfinite(dz).all()


def test_opcheck():
    B, H, T, D = 2, 2, 5, 32
    q, k, v = (rnd(B, H, T, D, seed=s, dtype=torch.float32).requires_grad_() for s in range(3))
    mask = padding_mask(B, T)
    torch.library.opcheck(torch.ops.minift.attention_fwd.default, (q, k, v, mask, 0.0, 0.2, 0, 0))
    torch.library.opcheck(torch.ops.minift.attention_fwd.default, (q, k, v, None, 0.1, 0.2, 7, 1))
    z = rnd(6, 4, dtype=torch.float32).requires_grad_()
    t = torch.tensor([0, 1, -100, 3, 2, 1])
    for reduction in (0, 1, 2):  # none, mean, sum
        torch.library.opcheck(torch.ops.minift.xent_fwd.default, (z, t, None, -100, 0.1, reduction))
        _, stats = torch.ops.minift.xent_fwd(z.detach(), t, None, -100, 0.1, reduction)   # (2, N): row max, log s
        g = rnd(6, dtype=torch.float32, seed=5) if reduction == 0 else torch.tensor(0.7)
        torch.library.opcheck(torch.ops.minift.xent_bwd.default, (g, z.detach(), t, None, stats, -100, 0.1, reduction))


def test_cross_entropy_mean_is_the_same_on_any_thread_count():
    """The mean/sum adds the rows in row order, so the loss does not depend on how the rows were
    split across threads."""
    z = rnd(3000, 5, dtype=torch.float32, scale=2.0)
    t = torch.randint(0, 5, (3000,), generator=torch.Generator().manual_seed(4))
    t[::7] = -100
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.softmax_cross_entropy(z, t)
        torch.set_num_threads(2)
        two = ops.softmax_cross_entropy(z, t)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    ref = F.cross_entropy(z.double(), t)
    assert abs(one.item() - ref.item()) <= 1e-6 * ref.item()


BAD_ATTENTION = [
    ("dtype", lambda q, k, v, m: (q.long(), k, v, m), "expected float32, float64, float16 or bfloat16"),
    ("rank", lambda q, k, v, m: (q[0], k, v, m), "expected q of shape \\(B, H, T, D\\)"),
    ("non-contiguous", lambda q, k, v, m: (q.transpose(2, 3), k, v, m), "contiguous"),
    ("mismatched k", lambda q, k, v, m: (q, k[:, :1], v, m), "expected k of shape"),
    ("mismatched v", lambda q, k, v, m: (q, k, v[..., :4], m), "attention v: expected shape"),
    ("mask dtype", lambda q, k, v, m: (q, k, v, m.long()), "bool key_padding_mask"),
    ("mask shape", lambda q, k, v, m: (q, k, v, m[:, :3]), "key_padding_mask of shape"),
    ("empty", lambda q, k, v, m: (q[:0], k[:0], v[:0], m[:0]), "non-empty"),
]


@pytest.mark.parametrize("name,make,msg", BAD_ATTENTION, ids=[b[0] for b in BAD_ATTENTION])
def test_attention_bad_input(name, make, msg):
    q, k, v = (rnd(2, 2, 5, 8, seed=s, dtype=torch.float32) for s in range(3))
    m = torch.ones(2, 5, dtype=torch.bool)
    q, k, v, m = make(q, k, v, m)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.minift.attention_fwd(q, k, v, m, 0.0, 1.0, 0, 0)


def test_attention_wrong_device_mix():
    q, k, v = (rnd(2, 2, 5, 8, seed=s, dtype=torch.float32) for s in range(3))
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.minift.attention_fwd(q, k.double(), v.double(), None, 0.0, 1.0, 0, 0)
    if torch.cuda.is_available():
        for args in [(q, k.cuda(), v.cuda()), (q.cuda(), k, v.cuda()), (q.cuda(), k.cuda(), v)]:
            with pytest.raises(RuntimeError, match="expected q, k, v on one device, got q on "):
                torch.ops.minift.attention_fwd(*args, None, 0.0, 1.0, 0, 0)
        with pytest.raises(RuntimeError, match="key_padding_mask on cpu"):
            torch.ops.minift.attention_fwd(q.cuda(), k.cuda(), v.cuda(), torch.ones(2, 5, dtype=torch.bool),
                                           0.0, 1.0, 0, 0)
        with pytest.raises(RuntimeError, match="logits and target on one device, got logits on cpu, target on cuda"):
            torch.ops.minift.xent_fwd(torch.randn(4, 3), torch.zeros(4, dtype=torch.long, device="cuda"),
                                      None, -100, 0.0, 1)


BAD_XENT = [
    ("rank", lambda z, t: (z[None], t), "logits of shape \\(N, C\\)"),
    ("target dtype", lambda z, t: (z, t.float()), "int64 targets"),
    ("target shape", lambda z, t: (z, t[:2]), "target of shape"),
    ("out of range", lambda z, t: (z, t.clone().fill_(9)), "targets in \\[0, 5\\)"),
    ("non-contiguous", lambda z, t: (z.t(), t), "contiguous"),
    ("empty", lambda z, t: (z[:0], t[:0]), "non-empty"),
    ("reduction", lambda z, t: (z, t), "expected reduction 0 \\(none\\), 1 \\(mean\\) or 2 \\(sum\\), got 3"),
]


@pytest.mark.parametrize("name,make,msg", BAD_XENT, ids=[b[0] for b in BAD_XENT])
def test_cross_entropy_bad_input(name, make, msg):
    z = rnd(5, 5, dtype=torch.float32)
    t = torch.tensor([0, 1, 2, 3, 4])
    z, t = make(z, t)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.minift.xent_fwd(z, t, None, -100, 0.0, 3 if name == "reduction" else 1)


def test_cross_entropy_backward_checks_the_row_statistics():
    z = rnd(5, 3, dtype=torch.float32)
    t = torch.tensor([0, 1, 2, 1, 0])
    _, stats = torch.ops.minift.xent_fwd(z, t, None, -100, 0.0, 1)
    assert stats.shape == (2, 5)
    torch.testing.assert_close(stats[0], z.amax(1), rtol=0, atol=0)             # the row max, exactly
    for bad in (stats[0], stats.t().contiguous(), stats.double()):
        with pytest.raises(RuntimeError, match="row statistics of shape \\(2, 5\\)"):
            torch.ops.minift.xent_bwd(torch.tensor(1.0), z, t, None, bad, -100, 0.0, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_model_equals_torch_on_minilm(batch, device):
    torch.manual_seed(0)
    model = minift.BertForSequenceClassification.from_pretrained("minilm", num_labels=3).eval().to(device)
    labels = torch.tensor([2, 0, 1, 0], device=device)
    args = tuple(batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids"))
    outs, grads = {}, {}
    for impl in ("torch", "fused"):
        model.zero_grad()
        out = model.set_impl(impl)(*args, labels=labels)
        out.loss.backward()
        outs[impl] = out
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    real = batch["attention_mask"].bool().to(device)
    assert (outs["fused"].logits - outs["torch"].logits).abs().max() <= 1e-5
    assert abs(outs["fused"].loss.item() - outs["torch"].loss.item()) <= 1e-5
    scale = max(g.abs().max() for g in grads["torch"].values())
    for n in grads["torch"]:
        assert (grads["fused"][n] - grads["torch"][n]).abs().max() <= 1e-5 * scale, n
    h_t = model.set_impl("torch").bert(*args).last_hidden_state
    h_f = model.set_impl("fused").bert(*args).last_hidden_state
    assert (h_f - h_t).abs()[real].max() <= 1e-5


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_model_under_autocast_on_cuda(batch, dtype):
    """MiniLM under autocast on the GPU, fused and torch, each against the same model in float64 on
    the CPU: the fused model's error (encoder output at real tokens, every parameter's gradient) is
    at most 2x the PyTorch ops' error, measured as the norm of the difference over the reference's."""
    torch.manual_seed(0)
    model = minift.BertForSequenceClassification.from_pretrained("minilm", num_labels=3).eval()
    labels = torch.tensor([2, 0, 1, 0])
    keys = ("input_ids", "attention_mask", "token_type_ids")
    real = batch["attention_mask"].bool()

    def run(m, device, amp):
        m.zero_grad()
        args = tuple(batch[k].to(device) for k in keys)
        with torch.autocast("cuda", dtype=dtype, enabled=amp):
            hidden = m.bert(*args).last_hidden_state
            loss = m(*args, labels=labels.to(device)).loss
        loss.backward()
        grads = torch.cat([p.grad.double().flatten().cpu() for p in m.parameters()])
        return hidden.double().cpu()[real], grads

    ref_h, ref_g = run(model.double().set_impl("torch"), "cpu", False)
    model.float().cuda()
    rel = {}
    for impl in ("torch", "fused"):
        h, g = run(model.set_impl(impl), "cuda", True)
        assert torch.isfinite(h).all() and torch.isfinite(g).all(), impl
        rel[impl] = ((h - ref_h).norm() / ref_h.norm()).item(), ((g - ref_g).norm() / ref_g.norm()).item()
    assert 1e-4 < rel["torch"][0] < 5e-2, rel       # autocast ran in low precision (float32 gives ~1e-6)
    assert rel["fused"][0] <= 2 * rel["torch"][0], rel
    assert rel["fused"][1] <= 2 * rel["torch"][1], rel


def test_attention_without_blas_equals_the_blas_path(tmp_path):
    """MINIFT_NO_BLAS=1 makes the CPU kernel multiply with its own loop (for builds without a BLAS)."""
    import subprocess
    import sys
    script = f"""
import torch
from minift import ops
g = torch.Generator().manual_seed(3)
q, k, v = (torch.randn(3, 2, 19, 40, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
mask = torch.arange(19)[None] < torch.tensor([19, 7, 0])[:, None]
out, lse = ops.attention_with_lse(q, k, v, mask, dropout_p=0.2, seed=5)
grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=g, dtype=torch.float64))
forced = __import__("os").environ.get("MINIFT_NO_BLAS") == "1"
assert not forced or "own loop" in torch.ops.minift.cpu_kernel_info()
torch.save([out.detach(), lse, *grads], r"{tmp_path}/" + ("loop" if forced else "blas") + ".pt")
"""
    env = dict(os.environ)
    for flag in ("0", "1"):
        env["MINIFT_NO_BLAS"] = flag if flag == "1" else ""
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    blas, loop = torch.load(tmp_path / "blas.pt"), torch.load(tmp_path / "loop.pt")
    for a, b in zip(blas, loop):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert blas[0].abs().sum() > 0 and (blas[0][2] == 0).all()
    assert "attention_matmul=" in torch.ops.minift.cpu_kernel_info()


def test_reduction_codes_come_from_the_extension_and_match_torch():
    """The xent ops' reduction argument is defined once (csrc/reduction.h); Python reads its names
    from the extension, and each code is the one PyTorch's own reduction enum gives the name."""
    from torch.nn import _reduction
    assert ops._reduction_names() == tuple(torch.ops.minift.xent_reduction_names()) == ("none", "mean", "sum")
    for name in ("none", "mean", "sum"):
        assert ops._reduction_code(name) == _reduction.get_enum(name)
