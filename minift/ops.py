"""The compiled kernels of minift._C as PyTorch custom ops, and what happens when they are missing.

The C++ side (csrc/) defines the ``minift`` operator library: ``attention_fwd``/``attention_bwd``,
``xent_fwd``/``xent_bwd`` (with the reduction inside the op), ``dropout_fwd``, ``dropout_mask`` and
``adamw_step_``, with CPU kernels always and CUDA kernels when built with CUDA. This module loads
them, in this order:

1. ahead of time: ``minift._C``, compiled by ``pip install --no-build-isolation -e .``;
2. just in time: ``torch.utils.cpp_extension.load`` compiles csrc/ with ninja on first use
   (into the torch extensions cache, so only once);
3. neither: ``fused_attention`` and ``softmax_cross_entropy`` run plain PyTorch ops instead, and
   one warning says why. ``minift doctor`` reports which of the three is active.

Each op has a fake (meta) implementation registered here, so torch.compile and
``torch.library.opcheck`` can trace it. The backward of each forward op is wired up in C++
(csrc/autograd.cpp, a kernel for the Autograd dispatch key) rather than with
``torch.library.register_autograd``: that Python layer runs on every call and cost more than the
cross-entropy kernels themselves on a small batch.
"""
from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

_state = {"mode": None, "reason": "", "registered": False}
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # the xent ops' reduction argument (at::Reduction's numbers)


def _source_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "csrc"


def _jit_build() -> None:
    from torch.utils.cpp_extension import CUDA_HOME, load

    from ._build import cpu_flags
    src = _source_dir()
    sources = sorted(glob.glob(str(src / "*.cpp")))
    flags, cuda_flags = ["-O3", "-fopenmp", *cpu_flags()], []
    if torch.cuda.is_available() and CUDA_HOME is not None:
        sources += sorted(glob.glob(str(src / "cuda" / "*.cu"))) + sorted(glob.glob(str(src / "cuda" / "*.cpp")))
        flags.append("-DMINIFT_WITH_CUDA")
        cuda_flags = ["-O3", "--use_fast_math", "-DMINIFT_WITH_CUDA"]
    load(name="minift_jit", sources=sources, extra_cflags=flags, extra_cuda_cflags=cuda_flags,
         extra_ldflags=["-fopenmp"], extra_include_paths=[str(src)], is_python_module=False, verbose=False)


def _load() -> tuple[str | None, str]:
    if os.environ.get("MINIFT_NO_EXTENSION") == "1":
        return None, "disabled by MINIFT_NO_EXTENSION=1"
    try:
        from . import _C  # noqa: F401  (importing registers the ops)
        return "ahead-of-time", "minift._C was compiled at install time"
    except ImportError as e:
        aot_error = str(e).splitlines()[0]
    if not (_source_dir() / "module.cpp").is_file():
        return None, f"minift._C is not built ({aot_error}) and the sources csrc/ are not beside the package"
    try:
        _jit_build()
        return "just-in-time", f"minift._C is not built ({aot_error}); compiled csrc/ with ninja on first use"
    except Exception as e:  # a missing compiler or ninja, a compile error: report and fall back
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"minift._C is not built ({aot_error}) and the just-in-time build failed: {first}"


def extension_status() -> dict:
    """{"mode": "ahead-of-time" | "just-in-time" | None, "reason": str, "cuda": bool}."""
    if _state["mode"] is None and not _state["reason"]:
        _state["mode"], _state["reason"] = _load()
        if _state["mode"] is None:
            warnings.warn(f"minift: the compiled kernels are not available ({_state['reason']}); "
                          "impl='fused' runs plain PyTorch ops instead", RuntimeWarning, stacklevel=3)
        else:
            _register()
    cuda = _state["mode"] is not None and _has_kernel("attention_fwd", torch.device("cuda"))
    return {"mode": _state["mode"], "reason": _state["reason"], "cuda": cuda}


def extension_available() -> bool:
    if _state["mode"] is not None:  # the common case, on every op call: no dispatcher query
        return True
    return extension_status()["mode"] is not None


def _require_extension(what: str) -> None:
    """The raw ops have no fallback: say why they cannot run."""
    status = extension_status()
    if status["mode"] is None:
        raise RuntimeError(f"{what} needs the compiled kernels, which are not available: {status['reason']}")


# ------------------------------------------------------------------------------------------
# Fake implementations (the autograd wiring is in csrc/autograd.cpp)
# ------------------------------------------------------------------------------------------

def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _register() -> None:
    if _state["registered"]:
        return
    _state["registered"] = True

    @torch.library.register_fake("minift::attention_fwd")
    def _(q, k, v, key_padding_mask, dropout_p, scale, seed, offset):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_acc_dtype(q))

    @torch.library.register_fake("minift::attention_bwd")
    def _(dout, q, k, v, out, lse, key_padding_mask, dropout_p, scale, seed, offset):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake("minift::xent_fwd")
    def _(logits, target, weight, ignore_index, label_smoothing, reduction):
        n = logits.shape[0]
        loss_shape = (n,) if reduction == _REDUCTIONS["none"] else ()
        # the loss, and the row statistics (row max, log sum exp(z - max)) the backward reads
        return (logits.new_empty(loss_shape, dtype=_acc_dtype(logits)),
                logits.new_empty((2, n), dtype=_acc_dtype(logits)))

    @torch.library.register_fake("minift::xent_bwd")
    def _(grad, logits, target, weight, stats, ignore_index, label_smoothing, reduction):
        return torch.empty_like(logits)

    @torch.library.register_fake("minift::dropout_fwd")
    def _(x, p, seed, offset):
        return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)

    @torch.library.register_fake("minift::adamw_step_")
    def _(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
        return None

    @torch.library.register_fake("minift::dropout_mask")
    def _(like, B, H, Tq, Tk, p, seed, offset):
        return like.new_empty((B, H, Tq, Tk), dtype=torch.bool)


# ------------------------------------------------------------------------------------------
# The public ops
# ------------------------------------------------------------------------------------------

def _seed(dropout_p: float, generator) -> int:
    """A fresh Philox seed from torch's generator, so torch.manual_seed makes dropout reproducible."""
    if dropout_p <= 0.0:
        return 0
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())


def fused_attention(q, k, v, key_padding_mask=None, dropout_p: float = 0.0, scale=None, generator=None):
    """softmax(q k^T * scale + mask) v without materialising the T x T matrix.

    q (B, H, Tq, D), k and v (B, H, Tk, D) in float32/float64/float16/bfloat16 (made contiguous
    here); key_padding_mask (B, Tk) bool with True = keep; a row with no kept key gives 0. Attention
    dropout draws its mask from Philox bits seeded from torch's generator, and the backward pass
    regenerates the same mask. Returns (B, H, Tq, D).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not extension_available():
        from .backends import naive_attention
        return naive_attention(q, k, v, key_padding_mask, dropout_p, scale)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous()
    out, _ = torch.ops.minift.attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), mask,
                                            float(dropout_p), scale, _seed(dropout_p, generator), 0)
    return out


_kernels: dict = {}  # (op, device type) -> has a kernel


def _has_kernel(op: str, device: torch.device) -> bool:
    """Whether the compiled op has a kernel for this device (CUDA ones exist only in CUDA builds)."""
    if device.type == "cpu":
        return extension_available()
    key = (op, device.type)
    if key not in _kernels:
        _kernels[key] = extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"minift::{op}", device.type.upper())
    return _kernels[key]


def fused_dropout(x, p: float, training: bool = True, generator=None):
    """Inverted dropout with Philox bits, drawn in parallel: the same result as F.dropout in
    distribution, several times faster on the CPU (PyTorch draws its mask on one thread), and the
    same mask on the CPU and the GPU for the same seed. float64 on the GPU, or without the compiled
    kernels, it is F.dropout."""
    if not training or p <= 0.0:
        return x
    if not _has_kernel("dropout_fwd", x.device) or (x.device.type != "cpu" and x.dtype == torch.float64):
        return F.dropout(x, p, training=True)
    y, _ = torch.ops.minift.dropout_fwd(x.contiguous(), float(p), _seed(p, generator), 0)
    return y


def adamw_step_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """One AdamW update of a parameter in place, in one pass over memory: CPU float32/float64, or
    CUDA float32 in a CUDA build."""
    _require_extension("adamw_step_")
    torch.ops.minift.adamw_step_(param, grad, exp_avg, exp_avg_sq, float(lr), float(beta1), float(beta2),
                                 float(eps), float(weight_decay), int(step))


def attention_with_lse(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, seed=0, offset=0):
    """The raw forward op: (O, row log-sum-exp), with an explicit Philox seed and offset."""
    _require_extension("attention_with_lse")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous()
    return torch.ops.minift.attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), mask,
                                          float(dropout_p), scale, int(seed), int(offset))


def dropout_mask(B, H, Tq, Tk, p, seed, offset=0, device="cpu"):
    """The keep-mask (B, H, Tq, Tk) that attention dropout uses for (seed, offset)."""
    _require_extension("dropout_mask")
    like = torch.empty(0, device=device)
    return torch.ops.minift.dropout_mask(like, B, H, Tq, Tk, float(p), int(seed), int(offset))


def softmax_cross_entropy(logits, target, ignore_index: int = -100, label_smoothing: float = 0.0,
                          reduction: str = "mean", weight=None):
    """Cross-entropy of logits (N, C) against int64 targets (N,), fused: loss and gradient in one
    pass over the logits each. "mean" averages over non-ignored rows (0 when every row is ignored,
    where F.cross_entropy gives NaN); the loss is float32 (float64 for float64 logits).

    weight: optional per-class weights (C,) in the logits' dtype, with F.cross_entropy's meaning:
    row n's loss is (1 - eps) w_{y_n} (-log p_{y_n}) + (eps/C) sum_c w_c (-log p_c), and "mean"
    divides the sum by sum_n w_{y_n} over the rows not ignored. It gets no gradient. The CUDA
    kernels take no weight yet and say so."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"softmax_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not extension_available():
        return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction=reduction)
    loss, _ = torch.ops.minift.xent_fwd(logits.contiguous(), target.contiguous(),
                                        None if weight is None else weight.contiguous(), int(ignore_index),
                                        float(label_smoothing), _REDUCTIONS[reduction])
    return loss
