"""The self-check: every compiled kernel against plain PyTorch, on every device present, each dtype.

A kernel is trusted on a device only after it has given the right answer there. For each kernel,
device and dtype this runs the compiled op and PyTorch's own ops on the same small irregular inputs
(cast to that dtype) and measures both against a float64 computation of the same function:

    error(x) = max |x - x_64| / max |x_64|          (over outputs and gradients)
    limit    = 2 * error(PyTorch, same dtype) + 4 eps(dtype)

so a low-precision kernel may be at most twice as far from the truth as PyTorch is (plus a few units
in the last place, for where PyTorch happens to be exact). A kernel that raises fails too.

``minift doctor`` prints the table; ``resolve_impl("auto", device)`` runs it once per
process and device before the compiled kernels are used there, and replaces a kernel that fails by
plain PyTorch. Sizes are small, so the whole check takes a fraction of a second.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops
from .functional import adamw_update_, naive_attention


@dataclass
class Row:
    kernel: str        # what was checked, e.g. "attention fwd+bwd"
    op: str            # the op the dispatch rule knows it by, e.g. "attention_fwd"
    device: str
    dtype: str
    error: float       # the kernel's error against float64, as defined above
    limit: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.error <= self.limit      # False for NaN


def _rel(x, ref) -> float:
    """max |x - ref| / max |ref|, in float64."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def _worst(outs, refs) -> float:
    return max(_rel(a, b) for a, b in zip(outs, refs))


def _limit(torch_error: float, dtype) -> float:
    return 2.0 * torch_error + 4.0 * torch.finfo(dtype).eps


def _inputs(shape, seed, device, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device)


# ------------------------------------------------------------------------------------------
# One check per kernel: returns (kernel error, PyTorch's error), both against float64
# ------------------------------------------------------------------------------------------

def _attention_errors(compiled, plain, qkv64, do64, dtype):
    """Forward + backward of compiled and plain in dtype against plain in float64: (ours, PyTorch's)."""
    def run(fn, dt):
        q, k, v = (t.to(dt).detach().requires_grad_() for t in qkv64)
        out = fn(q, k, v)
        out.backward(do64.to(dt))
        return [out, q.grad, k.grad, v.grad]
    ref = run(plain, torch.float64)
    return _worst(run(compiled, dtype), ref), _worst(run(plain, dtype), ref)


def _attention(device, dtype):
    B, H, T, D = 3, 2, 13, 32
    q64, k64, v64, do64 = (_inputs((B, H, T, D), s, device) for s in range(4))
    keep = torch.ones(B, T, dtype=torch.bool, device=device)
    keep[1, 9:] = False                      # padding
    keep[2, :] = False                       # a row with no key at all: 0, not NaN
    scale = D ** -0.5
    compiled = lambda q, k, v: torch.ops.minift.attention_fwd(q, k, v, keep, 0.0, scale, 0, 0)[0]
    plain = lambda q, k, v: naive_attention(q, k, v, keep, 0.0, scale)
    return _attention_errors(compiled, plain, (q64, k64, v64), do64, dtype)


def _packed_attention(device, dtype):
    from .model import pack_batch
    B, H, T, D = 3, 2, 13, 32
    lengths = torch.tensor([13, 9, 1])
    keep = (torch.arange(T)[None] < lengths[:, None]).to(device)
    packing = pack_batch(keep)
    index, cu = packing.index, packing.cu
    q64, k64, v64 = (_inputs((B * T, H, D), s, device)[index] for s in range(3))    # (N, H, D) packed
    do64 = _inputs((B * T, H, D), 3, device)[index]
    scale = D ** -0.5

    def padded(t):                                         # (N, H, D) -> (B, H, T, D), 0 at the pad
        return t.new_zeros(B * T, H, D).index_copy(0, index, t).view(B, T, H, D).transpose(1, 2)

    compiled = lambda q, k, v: torch.ops.minift.attention_packed_fwd(q, k, v, cu, cu, T, T, 0.0, scale, 0, 0)[0]
    plain = lambda q, k, v: naive_attention(padded(q), padded(k), padded(v), keep, 0.0, scale).transpose(
        1, 2).reshape(B * T, H, D)[index]
    return _attention_errors(compiled, plain, (q64, k64, v64), do64, dtype)


def _cross_entropy(device, dtype, weighted=False):
    worst = [0.0, 0.0]
    for N, C in ((37, 2), (29, 9), (11, 301)):            # the short-row and the long-row walkers
        z64 = _inputs((N, C), C, device, scale=3.0)
        t = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(N)).to(device)
        t[::5] = -100                                     # ignored rows
        w = None
        if weighted:                                      # class weights in [0.25, 2], as dtype rounds them
            w = (_inputs((C,), C + 1, device).abs() + 0.25).clamp_max(2.0).to(dtype).double()

        def run(fn, dt):
            z = z64.to(dt).detach().requires_grad_()
            wt = None if w is None else w.to(dt)
            rows = fn(z, wt, 0)                           # per-row losses
            fn(z, wt, 1).backward()                       # the mean's gradient
            return [rows, z.grad]
        compiled = lambda z, w, r: torch.ops.minift.xent_fwd(z, t, w, -100, 0.1, r)[0]
        plain = lambda z, w, r: F.cross_entropy(z, t, weight=w, label_smoothing=0.1, reduction=("none", "mean")[r])
        ref = run(plain, torch.float64)
        worst = [max(worst[0], _worst(run(compiled, dtype), ref)), max(worst[1], _worst(run(plain, dtype), ref))]
    return worst


def _dropout(device, dtype):
    p, x64 = 0.3, _inputs((4099,), 7, device)
    x = x64.to(dtype).requires_grad_()
    y, keep = torch.ops.minift.dropout_fwd(x, p, 1234, 0)
    y.backward(torch.ones_like(y))
    ref = [torch.where(keep, x64 / (1 - p), 0.0), keep.double() / (1 - p)]     # y and dy/dx for the same keep mask
    xd = x.detach()
    plain = [torch.where(keep, xd / (1 - p), torch.zeros_like(xd)), keep.to(dtype) / (1 - p)]
    rate = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    if abs(rate - (1 - p)) > 6 * sigma:                              # the mask itself is wrong
        return math.inf, _worst(plain, ref)
    return _worst([y, x.grad], ref), _worst(plain, ref)


def _adamw(device, dtype):
    shape = (1031,)

    def run(update, dt):
        p, m, v = (_inputs(shape, s, device).to(dt) for s in (1, 2, 3))
        v = v.abs()
        for step in range(1, 4):
            g = _inputs(shape, 10 + step, device).to(dt)
            update(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.01, step)
        return [p, m, v]
    compiled = lambda *a: torch.ops.minift.adamw_step_(*a)
    ref = run(adamw_update_, torch.float64)
    return _worst(run(compiled, dtype), ref), _worst(run(adamw_update_, dtype), ref)


def _worst_per_output(ours, theirs, refs) -> tuple[float, float, float]:
    """(error, PyTorch's error, limit) of the output furthest over its own limit, each output held to
    2x PyTorch's error + 4 eps of *its* dtype: the autocast rows mix a bf16 gradient with float32
    outputs, and bf16's eps (0.0078) would otherwise let a float32 output be 3% off."""
    rows = [(_rel(a, r), _rel(t, r), _limit(_rel(t, r), a.dtype)) for a, t, r in zip(ours, theirs, refs)]
    return max(rows, key=lambda row: row[0] - row[2])


def _autocast_dtypes(dtype, n):
    """The dtypes autocast hands the fused layers in a reduced dtype: the matmul's output (the first
    argument) in it, the residual stream and the parameters in float32. None (no such row) for
    float32 and float64."""
    return None if torch.finfo(dtype).bits > 16 else [dtype] + [torch.float32] * (n - 1)


def _add_layer_norm(device, dtype, autocast=False):
    N, H, p = 37, 48, 0.2
    y64, x64, do64 = (_inputs((N, H), s, device) for s in (1, 2, 3))
    w64, b64 = 1 + 0.3 * _inputs((H,), 4, device), _inputs((H,), 5, device)
    keep = torch.ops.minift.dropout_mask(y64, 1, 1, N, H, p, 99, 0).view(N, H)   # the bits add_layer_norm draws
    mixed = _autocast_dtypes(dtype, 4) if autocast else None
    if autocast and mixed is None:
        return None

    def run(fn, dt):
        dts = [dt] * 4 if mixed is None or dt == torch.float64 else mixed
        args = [t.to(d).detach().requires_grad_() for t, d in zip((y64, x64, w64, b64), dts)]
        out = fn(*args)
        out.backward(do64.to(out.dtype))
        return [out] + [a.grad for a in args]
    compiled = lambda y, x, w, b: torch.ops.minift.add_layer_norm_fwd(y, x, w, b, 1e-12, p, 99, 0)[0]
    plain = lambda y, x, w, b: F.layer_norm(torch.where(keep, y / (1 - p), 0.0) + x, (H,), w, b, 1e-12)
    ref = run(plain, torch.float64)
    if mixed is not None:
        return _worst_per_output(run(compiled, dtype), run(plain, dtype), ref)
    return _worst(run(compiled, dtype), ref), _worst(run(plain, dtype), ref)


def _bias_gelu(device, dtype, autocast=False):
    N, I = 29, 70
    h64, do64, b64 = _inputs((N, I), 1, device, scale=2.0), _inputs((N, I), 2, device), _inputs((I,), 3, device)
    mixed = _autocast_dtypes(dtype, 2) if autocast else None
    if autocast and mixed is None:
        return None

    def run(fn, dt):
        dts = [dt] * 2 if mixed is None or dt == torch.float64 else mixed
        h, b = (t.to(d).detach().requires_grad_() for t, d in zip((h64, b64), dts))
        out = fn(h, b)
        out.backward(do64.to(out.dtype))
        return [out, h.grad, b.grad]
    compiled = lambda h, b: torch.ops.minift.bias_gelu_fwd(h, b)[0]
    plain = lambda h, b: F.gelu(h + b).to(h.dtype)         # out in h's dtype, as the kernel gives it
    ref = run(plain, torch.float64)
    if mixed is not None:
        return _worst_per_output(run(compiled, dtype), run(plain, dtype), ref)
    return _worst(run(compiled, dtype), ref), _worst(run(plain, dtype), ref)


def _linear(device, dtype):
    """The linear layer through minift's own matmul where the build has one (whatever the backend
    chosen for the run: the check sets it for its duration, ops.using_gemm), forward and the three
    gradients."""
    N, K, O = 70, 130, 90                      # big enough for the own kernel (csrc/linear.cpp), ragged
    x64, do64 = _inputs((N, K), 1, device), _inputs((N, O), 2, device)
    w64, b64 = 0.1 * _inputs((O, K), 3, device), _inputs((O,), 4, device)

    def run(fn, dt):
        args = [t.to(dt).detach().requires_grad_() for t in (x64, w64, b64)]
        out = fn(*args)
        out.backward(do64.to(dt))
        return [out] + [a.grad for a in args]
    with ops.using_gemm("minift" if ops.own_gemm_built() else "torch"):
        ours = run(torch.ops.minift.linear_fwd, dtype)
    ref = run(F.linear, torch.float64)
    return _worst(ours, ref), _worst(run(F.linear, dtype), ref)


# (what is checked, the op the dispatch rule knows, the check, the optional arguments it uses: a
# device whose kernel takes none of them (ops.KERNEL_LACKS) skips the row)
CHECKS = [("attention fwd+bwd", "attention_fwd", _attention, ()),
          ("packed attention fwd+bwd", "attention_packed_fwd", _packed_attention, ()),
          ("cross-entropy fwd+bwd", "xent_fwd", _cross_entropy, ()),
          ("cross-entropy weighted", "xent_fwd", lambda device, dtype: _cross_entropy(device, dtype, True), ("weight",)),
          ("dropout fwd+bwd", "dropout_fwd", _dropout, ()),
          ("AdamW step", "adamw_step_", _adamw, ()),
          ("residual add + dropout + layer norm fwd+bwd", "add_layer_norm_fwd", _add_layer_norm, ()),
          ("residual add + dropout + layer norm, autocast dtypes", "add_layer_norm_fwd",
           lambda device, dtype: _add_layer_norm(device, dtype, autocast=True), ()),
          ("bias + GELU fwd+bwd", "bias_gelu_fwd", _bias_gelu, ()),
          ("bias + GELU, autocast dtypes", "bias_gelu_fwd", lambda device, dtype: _bias_gelu(device, dtype, True), ()),
          ("linear fwd+bwd (own matmul)", "linear_fwd", _linear, ())]


def devices_present() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return found


def run(devices=None) -> list[Row]:
    """Check every compiled kernel registered for each device, in each dtype it takes."""
    rows = []
    if not ops.extension_available():
        return rows
    for device in devices or devices_present():
        device = torch.device(device)
        for kernel, op, check, uses in CHECKS:
            if not ops._registered(op, device.type) or set(uses) & ops.KERNEL_LACKS[device.type].get(op, set()):
                continue
            for dtype in sorted(ops.KERNEL_DTYPES[device.type][op], key=lambda d: (-torch.finfo(d).bits, str(d))):
                name = str(dtype).replace("torch.", "")
                try:
                    result = check(device, dtype)
                    if result is None:                  # no such case in this dtype
                        continue
                    ours, theirs, *limit = result       # a check may set its own limit (per output)
                    rows.append(Row(kernel, op, str(device), name, ours, limit[0] if limit else _limit(theirs, dtype)))
                except Exception as e:  # a kernel that raises has failed its check
                    rows.append(Row(kernel, op, str(device), name, math.inf, 0.0,
                                    note=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    return rows


_checked: dict[str, list[Row]] = {}


def ensure_checked(device) -> list[Row]:
    """Run the check for ``device`` once per process; a failing kernel is disabled there (the
    dispatch rule then runs plain PyTorch for it). Returns the failed rows."""
    key = str(torch.device(device))
    if key not in _checked:
        failed = [r for r in run([device]) if not r.passed]
        for r in failed:
            ops.disable(r.op, torch.device(device).type,
                        f"{r.kernel} {r.dtype}: error {r.error:.2e} > limit {r.limit:.2e}{' ' + r.note if r.note else ''}")
        _checked[key] = failed
    return _checked[key]


def resolve_impl(impl: str, device) -> str:
    """``--impl auto``: "fused" when the compiled kernels are there, after this check on ``device``
    (once per process and device; a kernel that fails it is replaced by plain PyTorch, with a
    warning naming it), else "torch". Any other value is returned as it is."""
    if impl != "auto":
        return impl
    if not ops.extension_available():
        return "torch"
    for row in ensure_checked(torch.device(device)):
        warnings.warn(f"minift: the self-check failed the compiled {row.kernel} on {row.device} ({row.dtype}: "
                      f"error {row.error:.2e} > limit {row.limit:.2e}); plain PyTorch runs instead",
                      RuntimeWarning, stacklevel=2)
    return "fused"


def format_table(rows: list[Row]) -> str:
    table = [("kernel", "device", "dtype", "max error", "limit", "result")]
    table += [(r.kernel, r.device, r.dtype, f"{r.error:.2e}", f"{r.limit:.2e}",
               ("PASS" if r.passed else "FAIL") + (f"  {r.note}" if r.note else "")) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
