"""The checks behind `minift gradcheck`: every hand-derived gradient against PyTorch's autograd.

Each case gives the op, its float64 inputs (seeded, irregular shapes, a fully masked attention row),
our function and PyTorch's. A case passes when ``torch.autograd.gradcheck`` passes on ours (finite
differences against our backward) and our gradient equals autograd's through PyTorch's op to 1e-10.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from . import functional as RF
from .config import IGNORE_INDEX
from . import textbook
from .functional import naive_attention


@dataclass
class Result:
    op: str
    dtype: str
    shape: str
    max_error: float
    passed: bool


CLASS_WEIGHTS = torch.tensor([0.5, 2.0, 0.0, 1.25, 3.0], dtype=torch.float64)  # per-class weights, one of them 0


def _rand(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()


def _cases():
    """(name, shape text, inputs, ours, oracle)."""
    B, nh, T, D = 2, 2, 7, 5
    mask = torch.tensor([[False] * T, [True] * 4 + [False] * (T - 4)])    # row 0 fully masked
    t = torch.tensor([0, 3, IGNORE_INDEX, 2, 1, 4])
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    ids = torch.tensor([[1, 3, 3], [0, 5, 1]])
    keep = RF.dropout_mask((4, 6), 0.25, "cpu", torch.Generator().manual_seed(3))
    return [
        ("linear", "x(2,3,7) W(4,7)", [_rand(2, 3, 7, seed=0), _rand(4, 7, seed=1), _rand(4, seed=2)],
         RF.linear, F.linear),
        ("embedding", "W(6,4) ids(2,3)", [_rand(6, 4, seed=0)],
         lambda w: RF.embedding(ids, w), lambda w: F.embedding(ids, w)),
        ("layer_norm", "x(3,11)", [_rand(3, 11, seed=0, scale=2.0), _rand(11, seed=1), _rand(11, seed=2)],
         lambda x, w, b: RF.layer_norm(x, w, b, 1e-5), lambda x, w, b: F.layer_norm(x, (11,), w, b, 1e-5)),
        ("add + dropout + layer_norm", "y,x(4,6)",
         [_rand(4, 6, seed=0), _rand(4, 6, seed=1, scale=2.0), _rand(6, seed=2), _rand(6, seed=3)],
         lambda y, x, w, b: RF.AddLayerNorm.apply(y, x, w, b, keep, 0.25, 1e-5),
         lambda y, x, w, b: F.layer_norm(y * keep / 0.75 + x, (6,), w, b, 1e-5)),
        ("gelu", "x(4,9)", [_rand(4, 9, seed=0, scale=3.0)], RF.gelu, F.gelu),
        ("bias + gelu", "h(4,9) b(9)", [_rand(4, 9, seed=0, scale=3.0), _rand(9, seed=1)],
         RF.bias_gelu, lambda h, b: F.gelu(h + b)),
        ("tanh", "x(4,9)", [_rand(4, 9, seed=0, scale=2.0)], RF.tanh, torch.tanh),
        ("softmax", "x(4,9)", [_rand(4, 9, seed=0, scale=2.0)], RF.softmax, lambda x: torch.softmax(x, -1)),
        ("dropout p=0.25", "x(4,6)", [_rand(4, 6, seed=0)],
         lambda x: RF.Dropout.apply(x, keep, 0.25), lambda x: x * keep / 0.75),
        ("attention+mask", f"q,k,v({B},{nh},{T},{D})", [_rand(B, nh, T, D, seed=s) for s in range(3)],
         lambda q, k, v: RF.attention(q, k, v, mask), lambda q, k, v: naive_attention(q, k, v, mask)),
        ("cross_entropy ls=0.1", "z(6,5) 1 ignored", [_rand(6, 5, seed=0, scale=2.0)],
         lambda z: RF.cross_entropy(z, t, label_smoothing=0.1),
         lambda z: F.cross_entropy(z, t, label_smoothing=0.1)),
        ("cross_entropy weighted ls=0.1", "z(6,5) w(5) 1 ignored", [_rand(6, 5, seed=0, scale=2.0)],
         lambda z: RF.cross_entropy(z, t, label_smoothing=0.1, weight=CLASS_WEIGHTS),
         lambda z: F.cross_entropy(z, t, label_smoothing=0.1, weight=CLASS_WEIGHTS)),
        ("bce_with_logits", "z(2,3)", [_rand(2, 3, seed=0, scale=3.0)],
         lambda z: RF.bce_with_logits(z, y), lambda z: F.binary_cross_entropy_with_logits(z, y)),
        ("mse_loss", "p(7)", [_rand(7, seed=0), _rand(7, seed=1)], RF.mse_loss, F.mse_loss),
    ]


def _max_grad_error(ours: Callable, oracle: Callable, inputs) -> float:
    out = ours(*inputs)
    g = torch.Generator().manual_seed(9)
    upstream = torch.randn(out.shape, generator=g, dtype=out.dtype)
    a = torch.autograd.grad(ours(*inputs), inputs, upstream)
    b = torch.autograd.grad(oracle(*inputs), inputs, upstream)
    fwd = (ours(*inputs) - oracle(*inputs)).abs().max().item()
    return max([fwd] + [(x - y).abs().max().item() for x, y in zip(a, b)])


def textbook_case() -> Result:
    """The two-layer sigmoid model's BCE gradient, formula term by term against autograd."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(13, 6, generator=g, dtype=torch.float64) * 2
    y = (torch.rand(13, generator=g) > 0.5).double()
    p = textbook.init_params(6, 4, seed=1)
    a, b = textbook.gradient_by_formula(x, y, p), textbook.gradient_by_autograd(x, y, p)
    err = max((a[k] - b[k]).abs().max().item() for k in a)
    return Result("textbook BCE gradient", "float64", "x(13,6) K=4", err, err <= 1e-10)


def run_all(extra: list[Callable[[], list[Result]]] = ()) -> list[Result]:
    results = []
    for name, shape, inputs, ours, oracle in _cases():
        try:
            ok = gradcheck(ours, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
        except RuntimeError:
            ok = False
        err = _max_grad_error(ours, oracle, inputs)
        results.append(Result(name, "float64", shape, err, ok and err <= 1e-10))
    results.append(textbook_case())
    for more in extra:
        results.extend(more())
    return results


def format_table(results: list[Result]) -> str:
    rows = [("op", "dtype", "shape", "max error", "result")]
    rows += [(r.op, r.dtype, r.shape, f"{r.max_error:.2e}", "PASS" if r.passed else "FAIL") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def kernel_cases() -> list[Result]:
    """The compiled CPU kernels, float64: gradcheck, and equality with the hand-derived ops."""
    from . import ops
    if not ops.extension_available():
        return [Result("compiled kernels", "-", "-", float("nan"), False)]
    results = []
    B, H, T = 2, 2, 7
    mask = torch.tensor([[False] * T, [True] * 5 + [False] * (T - 5)])
    for D in (32, 48):
        q, k, v = (_rand(B, H, T, D, seed=s) for s in range(3))
        fn = lambda q, k, v: ops.fused_attention(q, k, v, mask)
        ok = gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True, raise_exception=False)
        err = _max_grad_error(fn, lambda q, k, v: RF.attention(q, k, v, mask), (q, k, v))
        results.append(Result("fused_attention (C++)", "float64", f"q,k,v({B},{H},{T},{D})", err, ok and err <= 1e-10))
    q, k, v = (_rand(B, H, T, 32, seed=s) for s in range(3))
    fn = lambda q, k, v: ops.attention_with_lse(q, k, v, mask, dropout_p=0.3, seed=11)[0]
    keep = ops.dropout_mask(B, H, T, T, 0.3, seed=11)
    ref = lambda q, k, v: RF.Attention.apply(q, k, v, mask, 32 ** -0.5, keep, 0.3)
    ok = gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True, raise_exception=False)
    err = _max_grad_error(fn, ref, (q, k, v))
    results.append(Result("fused_attention p=0.3", "float64", f"q,k,v({B},{H},{T},32)", err, ok and err <= 1e-10))
    t = torch.tensor([0, 3, IGNORE_INDEX, 2, 1, 4])
    z = _rand(6, 5, seed=0, scale=2.0)
    fn = lambda z: ops.softmax_cross_entropy(z, t, label_smoothing=0.1)
    ok = gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False)
    err = _max_grad_error(fn, lambda z: F.cross_entropy(z, t, label_smoothing=0.1), (z,))
    results.append(Result("softmax_cross_entropy (C++)", "float64", "z(6,5) 1 ignored", err, ok and err <= 1e-10))
    fn = lambda z: ops.softmax_cross_entropy(z, t, label_smoothing=0.1, weight=CLASS_WEIGHTS)
    ok = gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False)
    err = _max_grad_error(fn, lambda z: F.cross_entropy(z, t, label_smoothing=0.1, weight=CLASS_WEIGHTS), (z,))
    results.append(Result("softmax_cross_entropy weighted (C++)", "float64", "z(6,5) w(5) 1 ignored", err,
                          ok and err <= 1e-10))
    return results


def extra_checks() -> list[Callable[[], list[Result]]]:
    """Further groups of checks: the compiled kernels."""
    return [kernel_cases]
