"""The compiled kernels of minift._C as PyTorch custom ops, and the one rule for when they run.

The C++ side (csrc/) defines the ``minift`` operator library: ``attention_fwd``/``attention_bwd``,
``xent_fwd``/``xent_bwd`` (with the reduction inside the op), ``dropout_fwd``, ``dropout_mask``,
``adamw_step_``, with CPU kernels always and CUDA kernels when built with CUDA; and the CPU-only
``add_layer_norm_fwd``/``_bwd`` and ``bias_gelu_fwd``/``_bwd``. This module loads them, in this
order:

1. ahead of time: ``minift._C``, compiled by ``pip install --no-build-isolation -e .``;
2. just in time: ``torch.utils.cpp_extension.load`` compiles csrc/ with ninja on first use
   (into the torch extensions cache, so only once); if the CUDA part fails, the CPU part alone;
3. neither: every op below runs plain PyTorch, and says why.

**One dispatch rule** for every public op (``fused_attention``, ``softmax_cross_entropy``,
``fused_dropout``, ``adamw_step_``, ``add_layer_norm``, ``bias_gelu``): the compiled kernel runs
when one is registered for the input's device, takes its dtype and the optional arguments the
call uses (the CUDA cross-entropy takes no class ``weight``), and the self-check
(minift.selfcheck) has not failed it on that device; otherwise the plain-PyTorch path runs, with
one warning per (op, device, optional arguments used) naming the reason.
``extension_status()`` only reads the load state; ``minift doctor`` prints it.

Each op has a fake (meta) implementation registered here, so torch.compile and
``torch.library.opcheck`` can trace it. The backward of each forward op is wired up in C++
(csrc/autograd.cpp, a kernel for the Autograd dispatch key) rather than with
``torch.library.register_autograd``: that Python layer runs on every call and cost more than the
cross-entropy kernels themselves on a small batch.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .functional import adamw_update_, check_class_weight, key_padding_keep, naive_attention

_REDUCTIONS = ("none", "mean", "sum")     # softmax_cross_entropy's reduction=, F.cross_entropy's names


def _reduction_code(name: str) -> int:
    """The xent ops' reduction argument for ``name``: its number in csrc/reduction.h (the one
    definition, at::Reduction's numbering), which the extension lists in code order."""
    return _reduction_names().index(name)


@functools.cache
def _reduction_names() -> tuple[str, ...]:
    return tuple(torch.ops.minift.xent_reduction_names())

_F32, _F64, _F16, _BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
# The dtypes each compiled kernel takes, by device type (csrc/*.cpp and csrc/cuda/cuda_ops.cpp).
KERNEL_DTYPES = {
    "cpu": {"attention_fwd": {_F32, _F64, _F16, _BF16}, "attention_packed_fwd": {_F32, _F64, _F16, _BF16},
            "xent_fwd": {_F32, _F64, _F16, _BF16},
            "dropout_fwd": {_F32, _F64, _F16, _BF16}, "adamw_step_": {_F32, _F64},
            "add_layer_norm_fwd": {_F32, _F64, _F16, _BF16}, "bias_gelu_fwd": {_F32, _F64, _F16, _BF16},
            "linear_fwd": {_F32}},
    "cuda": {"attention_fwd": {_F32, _F16, _BF16}, "xent_fwd": {_F32, _F16, _BF16},
             "dropout_fwd": {_F32, _F16, _BF16}, "adamw_step_": {_F32}},
}
# The optional arguments a compiled kernel does not take, by device type: a call that passes one
# runs plain PyTorch (the CUDA cross-entropy kernels have no per-class weights).
KERNEL_LACKS = {"cpu": {}, "cuda": {"xent_fwd": {"weight"}}}


@dataclass
class LoadState:
    """Everything this module knows about the compiled kernels, in one place."""
    mode: str | None = None          # "ahead-of-time" | "just-in-time" | None (plain PyTorch)
    reason: str = ""                 # why that mode
    cuda_build: str = ""             # why there are or are not CUDA kernels (from the build)
    loaded: bool = False             # whether loading was attempted
    disabled: dict = field(default_factory=dict)   # (op, device type) -> why the self-check failed it
    warned: set = field(default_factory=set)       # (op, device type, arguments used) already warned about
    verdicts: dict = field(default_factory=dict)   # (op, device type, dtype, arguments used) -> None | reason
    gemm: str | None = None          # "minift" | "torch": the float32 CPU matmul of linear (gemm_backend)
    gemm_why: str = ""               # why that one


_state = LoadState()


def source_dir() -> Path:
    """The C++/CUDA sources: csrc/ beside the package in a source tree, minift/_csrc/ in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "_csrc"):
        if (candidate / "module.cpp").is_file():
            return candidate
    return here.parent / "csrc"


def _jit_precompiled_header(flags: list[str]) -> list[str]:
    """The flags that compile the kernel files against a precompiled header of torch's headers
    (``_build.precompiled_header``), built with the options torch's ``load`` compiles them with;
    kept beside the build folder, so that later loads find their objects up to date."""
    from torch.utils import cpp_extension

    from ._build import precompiled_header, torch_cxx_std
    try:
        where = os.path.join(os.path.dirname(cpp_extension._get_build_directory("minift_jit", False)), "minift_jit_pch")
        # the ABI macro, where this torch's load() passes one (older versions do)
        abi = getattr(cpp_extension, "_get_glibcxx_abi_build_flags", lambda: [])()
    except Exception:            # a torch without these internals: compile without it
        return []
    return precompiled_header(cpp_extension.get_cxx_compiler(),
                              ["-fPIC", torch_cxx_std(), "-DTORCH_API_INCLUDE_EXTENSION_H", *abi, *flags], where)


def _jit_build() -> str:
    """Compile csrc/ with ninja; returns what happened to the CUDA kernels."""
    from torch.utils.cpp_extension import CUDA_HOME, load

    from ._build import choose_cxx, cpu_flags, first_error_line
    note = choose_cxx()                 # RuntimeError (no usable compiler): _load reports it as the reason
    if note:
        print(note, file=sys.stderr, flush=True)
    src = source_dir()
    cpu_sources = sorted(glob.glob(str(src / "*.cpp")))
    # as setup.py: DEBUG=1 builds without optimisation and with debug information (for gdb), -O3 otherwise
    debug = os.environ.get("DEBUG", "0") == "1"
    flags = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    flags += ["-fopenmp", *cpu_flags()]
    flags += _jit_precompiled_header(flags)
    common = dict(name="minift_jit", extra_ldflags=["-fopenmp"], extra_include_paths=[str(src)],
                  is_python_module=False, verbose=False)
    if not torch.cuda.is_available():
        load(sources=cpu_sources, extra_cflags=flags, **common)
        return "not built: no GPU is visible to torch"
    if CUDA_HOME is None or os.environ.get("MINIFT_NO_CUDA") == "1":
        load(sources=cpu_sources, extra_cflags=flags, **common)
        return "not built: " + ("MINIFT_NO_CUDA=1" if CUDA_HOME is not None else "nvcc was not found (set CUDA_HOME)")
    cuda_sources = sorted(glob.glob(str(src / "cuda" / "*.cu"))) + sorted(glob.glob(str(src / "cuda" / "*.cpp")))
    try:
        load(sources=cpu_sources + cuda_sources, extra_cflags=[*flags, "-DMINIFT_WITH_CUDA"],
             extra_cuda_cflags=[*(["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math"]), "-DMINIFT_WITH_CUDA"],
             **common)
        return "built"
    except Exception as e:  # a CUDA compile error must not cost the CPU kernels
        load(sources=cpu_sources, extra_cflags=flags, **common)
        return f"not built: the CUDA build failed ({first_error_line(str(e))})"


def _build_record() -> dict | None:
    """What the ahead-of-time build recorded (setup.py writes minift/_build_info.json), or None."""
    try:
        return json.loads((Path(__file__).resolve().parent / "_build_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_build_info() -> str:
    """What the ahead-of-time build recorded about CUDA."""
    info = _build_record()
    if info is None:
        return "unknown (no build record)"
    return "built" if info.get("cuda") == "built" else f"not built: {info.get('detail', info.get('cuda'))}"


def _import_aot() -> None:
    """Import minift._C, unless it was built for vectors this CPU lacks (a module built on an
    AVX-512 machine, then copied to an AVX2 one, would die on its first AVX-512 instruction)."""
    from ._build import cpu_runs
    simd = (_build_record() or {}).get("simd", "none")
    if not cpu_runs(simd):
        raise ImportError(f"it was built for {simd} vectors, which this CPU lacks")
    from . import _C  # noqa: F401  (importing registers the ops)


def _load() -> None:
    if _state.loaded:
        return
    _state.loaded = True
    if os.environ.get("MINIFT_NO_EXTENSION") == "1":
        _state.reason = "disabled by MINIFT_NO_EXTENSION=1"
    else:
        try:
            _import_aot()
            _state.mode, _state.reason = "ahead-of-time", "minift._C was compiled at install time"
            _state.cuda_build = _read_build_info()
        except ImportError as e:
            aot_error = str(e).splitlines()[0]
            if not (source_dir() / "module.cpp").is_file():
                _state.reason = f"minift._C did not load ({aot_error}) and the sources csrc/ are not beside the package"
            else:
                try:
                    _state.cuda_build = _jit_build()
                    _state.mode = "just-in-time"
                    _state.reason = f"minift._C did not load ({aot_error}); compiled csrc/ with ninja on first use"
                except Exception as e:  # a missing compiler or ninja, a compile error: report and fall back
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    _state.reason = f"minift._C did not load ({aot_error}) and the just-in-time build failed: {first}"
    if _state.mode is None:
        warnings.warn(f"minift: the compiled kernels are not available ({_state.reason}); "
                      "impl='fused' runs plain PyTorch ops instead", RuntimeWarning, stacklevel=4)
    else:
        _register()


def extension_status() -> dict:
    """{"mode": "ahead-of-time" | "just-in-time" | None, "reason": str, "cuda": bool, "cuda_build": str,
    "disabled": {(op, device type): why}}: a read of the load state."""
    _load()
    cuda = _state.mode is not None and _registered("attention_fwd", "cuda")
    return {"mode": _state.mode, "reason": _state.reason, "cuda": cuda,
            "cuda_build": "built" if cuda else (_state.cuda_build or "not built"),
            "disabled": dict(_state.disabled)}


def extension_available() -> bool:
    """Whether minift._C is loaded (CPU kernels at least)."""
    if not _state.loaded:
        _load()
    return _state.mode is not None


def _registered(op: str, device_type: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"minift::{op}", device_type.upper())


def why_not_compiled(op: str, t: torch.Tensor, uses: tuple = ()) -> str | None:
    """None when the compiled ``op`` runs for tensors like ``t`` and the optional arguments named in
    ``uses`` (e.g. ``("weight",)``); else the reason it does not."""
    key = (op, t.device.type, t.dtype, uses)
    if key in _state.verdicts:
        return _state.verdicts[key]
    if not extension_available():
        why = f"the compiled kernels are not available: {_state.reason}"
    elif not _registered(op, t.device.type):
        why = f"minift._C has no {t.device.type} kernel for it"
        if t.device.type == "cuda":
            why += f" (CUDA kernels {extension_status()['cuda_build']})"
    elif t.dtype not in KERNEL_DTYPES.get(t.device.type, {}).get(op, ()):
        why = f"its {t.device.type} kernel takes no {t.dtype}"
    elif lacking := sorted(set(uses) & KERNEL_LACKS.get(t.device.type, {}).get(op, set())):
        why = f"its {t.device.type} kernel takes no {', '.join(lacking)} argument"
    elif (op, t.device.type) in _state.disabled:
        why = f"the self-check failed it on {t.device.type}: {_state.disabled[(op, t.device.type)]}"
    else:
        why = None
    _state.verdicts[key] = why
    return why


def use_compiled(op: str, t: torch.Tensor, public_name: str | None = None, uses: tuple = ()) -> bool:
    """The dispatch rule: True when the compiled ``op`` runs for ``t`` and the optional arguments
    ``uses``; otherwise warn once per (op, device, uses) with the reason, and the caller runs plain
    PyTorch."""
    why = why_not_compiled(op, t, uses)
    if why is None:
        return True
    if (op, t.device.type, uses) not in _state.warned:
        _state.warned.add((op, t.device.type, uses))
        warnings.warn(f"minift: {public_name or op} runs plain PyTorch on {t.device.type} ({t.dtype}): {why}",
                      RuntimeWarning, stacklevel=3)
    return False


def disable(op: str, device_type: str, why: str) -> None:
    """Stop using a compiled kernel on a device (the self-check calls this when a kernel fails)."""
    _state.disabled[(op, device_type)] = why
    _state.verdicts.clear()


def _require_extension(what: str) -> None:
    """The raw ops (for tests and teaching) have no fallback: say why they cannot run."""
    if not extension_available():
        raise RuntimeError(f"{what} needs the compiled kernels, which are not available: {_state.reason}")


# ------------------------------------------------------------------------------------------
# Fake implementations (the autograd wiring is in csrc/autograd.cpp)
# ------------------------------------------------------------------------------------------

def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    """The fused layers' compute dtype for inputs of mixed dtypes: float64 if any is, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _register() -> None:
    _reduction_names()          # read once here, outside any tracing (the fake of xent_fwd uses it)

    @torch.library.register_fake("minift::gemm")
    def _(a, b, trans_a, trans_b, bias):
        m = a.shape[1] if trans_a else a.shape[0]
        n = b.shape[0] if trans_b else b.shape[1]
        return a.new_empty((m, n))

    @torch.library.register_fake("minift::linear_fwd")
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("minift::attention_fwd")
    def _(q, k, v, key_padding_mask, dropout_p, scale, seed, offset):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_acc_dtype(q))

    @torch.library.register_fake("minift::attention_bwd")
    def _(dout, q, k, v, out, lse, key_padding_mask, dropout_p, scale, seed, offset):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake("minift::attention_packed_fwd")
    def _(q, k, v, cu_q, cu_k, Tq, Tk, dropout_p, scale, seed, offset):
        return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=_acc_dtype(q))

    @torch.library.register_fake("minift::attention_packed_bwd")
    def _(dout, q, k, v, out, lse, cu_q, cu_k, Tq, Tk, dropout_p, scale, seed, offset):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    # The packed op's autograd, in Python (the others' is in csrc/autograd.cpp): the backward is
    # attention_packed_bwd on what the forward saved, the derivation in csrc/attention.cpp.
    def setup_packed(ctx, inputs, output):
        q, k, v, cu_q, cu_k, Tq, Tk, p, scale, seed, offset = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (Tq, Tk, p, scale, seed, offset)

    def packed_backward(ctx, dout, _dlse):
        if dout is None:
            return (None,) * 11
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dout = _attention_layout(dout)
        dq, dk, dv = torch.ops.minift.attention_packed_bwd(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        return (dq, dk, dv) + (None,) * 8

    torch.library.register_autograd("minift::attention_packed_fwd", packed_backward, setup_context=setup_packed)

    @torch.library.register_fake("minift::xent_fwd")
    def _(logits, target, weight, ignore_index, label_smoothing, reduction):
        n = logits.shape[0]
        loss_shape = (n,) if reduction == _reduction_code("none") else ()
        # the loss, and the row statistics (row max, log sum exp(z - max)) the backward reads
        return (logits.new_empty(loss_shape, dtype=_acc_dtype(logits)),
                logits.new_empty((2, n), dtype=_acc_dtype(logits)))

    @torch.library.register_fake("minift::xent_bwd")
    def _(grad, logits, target, weight, stats, ignore_index, label_smoothing, reduction):
        return torch.empty_like(logits)

    @torch.library.register_fake("minift::xent_fwd_grad")
    def _(logits, target, ignore_index, label_smoothing, reduction):
        acc = _acc_dtype(logits)
        return logits.new_empty((), dtype=acc), logits.new_empty((2, logits.shape[0]), dtype=acc), torch.empty_like(logits)

    @torch.library.register_fake("minift::xent_bwd_into")
    def _(dz, grad, logits, target, stats, ignore_index, label_smoothing, reduction):
        return dz

    @torch.library.register_fake("minift::dropout_fwd")
    def _(x, p, seed, offset):
        return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)

    @torch.library.register_fake("minift::adamw_step_")
    def _(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
        return None

    @torch.library.register_fake("minift::add_layer_norm_fwd")
    def _(y, x, weight, bias, eps, dropout_p, seed, offset):
        acc = _compute_dtype(y, x, weight, bias)
        keep_shape = y.shape if dropout_p > 0 else (0,)
        return (y.new_empty(y.shape, dtype=torch.promote_types(y.dtype, x.dtype)), y.new_empty(y.shape, dtype=acc),
                y.new_empty(y.shape[:-1], dtype=acc), y.new_empty(y.shape[:-1], dtype=acc),
                y.new_empty(keep_shape, dtype=torch.bool))

    @torch.library.register_fake("minift::add_layer_norm_bwd")
    def _(dout, z, weight, mean, rstd, keep, dropout_p):
        dy_shape = z.shape if dropout_p > 0 else (0,)
        return (torch.empty_like(z), z.new_empty(dy_shape), z.new_empty(weight.shape), z.new_empty(weight.shape))

    @torch.library.register_fake("minift::bias_gelu_fwd")
    def _(h, bias):
        return torch.empty_like(h), h.new_empty(h.shape, dtype=_compute_dtype(h, bias))

    @torch.library.register_fake("minift::bias_gelu_bwd")
    def _(dout, pre):
        return torch.empty_like(dout), pre.new_empty(pre.shape[-1:])

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

    q (B, H, Tq, D), k and v (B, H, Tk, D) in float32/float64/float16/bfloat16 (on the CPU read
    at their strides where each row of D is contiguous, else copied; contiguous on a GPU);
    key_padding_mask (B, Tk), bool or 0/1, 1 = keep (an additive float mask is refused: see
    minift.functional.key_padding_keep); a row with no kept key gives 0. Attention dropout draws its
    mask from Philox bits seeded from torch's generator, and the backward pass regenerates the same
    mask. Returns (B, H, Tq, D).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    keep = key_padding_keep(key_padding_mask)
    if not use_compiled("attention_fwd", q, "fused_attention"):
        return naive_attention(q, k, v, keep, dropout_p, scale)
    mask = None if keep is None else keep.contiguous()
    out, _ = torch.ops.minift.attention_fwd(_attention_layout(q), _attention_layout(k), _attention_layout(v), mask,
                                            float(dropout_p), scale, _seed(dropout_p, generator), 0)
    return out


def _attention_layout(t):
    """t as the attention kernels read it: on the CPU any (B, H, T, D) strides with rows of D
    contiguous (the projections' output viewed per head is read in place, and O is written in
    the same order, so `o.transpose(1, 2).reshape(B, T, H * D)` costs no copy); on a GPU contiguous."""
    if t.device.type == "cpu" and (t.stride(-1) == 1 or t.shape[-1] == 1):
        return t
    return t.contiguous()


def packed_attention(q, k, v, cu_q, cu_k, Tq: int, Tk: int, dropout_p: float = 0.0, scale=None,
                     generator=None):
    """Attention over packed sequences (CPU): the tokens of B sequences one after another, no
    padding. q (Nq, H, D), k and v (Nk, H, D); sequence b's queries are rows cu_q[b] .. cu_q[b+1]-1
    of q and its keys rows cu_k[b] .. cu_k[b+1]-1 of k and v (cu_q, cu_k: int64 (B + 1,), from 0),
    and each query attends to its own sequence's keys only, all of them. Tq and Tk: the padded
    lengths the tokens came from. They number the dropout bits, so a right-padded batch packed
    (``minift.model.pack_batch``) draws the same attention-dropout mask as the padded batch does in
    ``fused_attention``. Rows of D must be contiguous (the projections' (N, H*D) output viewed as
    (N, H, D) is read in place). Returns (Nq, H, D) in q's layout.

    Padded attention spends its work on the pad: the projections, layer norms and feed-forward of
    every padded position, and (with a padded query row) its attention. Packed, the model computes
    the real tokens only; this op is what makes that possible (BertModel packs a padded batch
    under impl="fused" on the CPU)."""
    _require_extension("packed_attention")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = torch.ops.minift.attention_packed_fwd(q, k, v, cu_q, cu_k, int(Tq), int(Tk), float(dropout_p), scale,
                                                   _seed(dropout_p, generator), 0)
    return out


GEMM_PROBE = (512, 384, 1536)      # the product the choice times: (tokens, in, out) of a MiniLM FFN layer


def gemm_backend(choice: str | None = None) -> str:
    """The float32 CPU matrix multiply that ``linear`` (every linear layer under impl="fused") runs:
    "minift", the kernel of csrc/cpu_sgemm.h, or "torch", PyTorch's (MKL on x86 builds).

    ``choice`` (or the environment's MINIFT_GEMM): "minift", "torch" or "auto", the default. Auto times
    both on one layer-sized product (GEMM_PROBE, a few milliseconds, once per process) and keeps
    minift's where it is at least 1.1x faster. Both give a float32 result as accurate as the other
    (tests/test_gemm.py); what differs between CPUs is speed: MKL runs its AVX2 code on some CPUs
    that have AVX-512 (AMD's), at under half of what their FMA units do, and its best code on
    Intel's. ``gemm_backend_why()`` says what was measured."""
    wanted = (choice or os.environ.get("MINIFT_GEMM") or "auto").lower()
    if wanted not in ("auto", "minift", "torch"):
        raise ValueError(f"MINIFT_GEMM / gemm_backend: expected auto, minift or torch, got {wanted!r}")
    if choice is None and _state.gemm is not None:
        return _state.gemm
    asked = f"gemm_backend({wanted!r})" if choice else f"MINIFT_GEMM={wanted}"
    have = _has_gemm_op()
    own = own_gemm_built()
    if wanted == "torch" or not own:
        backend = "torch"
        why = (asked if wanted == "torch" else
               "minift's own matmul is not in this build (it needs AVX2+FMA or AVX-512 when compiled)" if have else
               f"the compiled kernels are not available: {_state.reason}")
        if wanted == "minift":
            raise RuntimeError(f"{asked}: {why}")
    elif wanted == "minift":
        backend, why = "minift", asked
    else:
        backend, why = _time_gemm()
    if have:
        torch.ops.minift.gemm_backend(backend)
    _state.gemm, _state.gemm_why = backend, why
    return backend


def _has_gemm_op() -> bool:
    return extension_available() and _registered("linear_fwd", "cpu")


def own_gemm_built() -> bool:
    """Whether the compiled extension carries minift's own matmul (built with AVX2+FMA or AVX-512)."""
    return _has_gemm_op() and torch.ops.minift.gemm_own_kernel() != "none"


@contextlib.contextmanager
def using_gemm(which: str):
    """``gemm_backend(which)`` inside a with block; after it, the choice and its reason as before
    (the self-check and the tests run the own kernel whatever the run chose)."""
    saved = gemm_backend(), _state.gemm_why
    gemm_backend(which)
    try:
        yield
    finally:
        _state.gemm, _state.gemm_why = saved
        if _has_gemm_op():
            torch.ops.minift.gemm_backend(saved[0])


def gemm_backend_why() -> str:
    """One line: which float32 CPU matmul the linear layers use, and why (what was timed)."""
    backend = gemm_backend()
    what = "minift's own kernel" if backend == "minift" else "PyTorch's (torch.mm)"
    return f"{what}: {_state.gemm_why}"


def _time_gemm() -> tuple[str, str]:
    import statistics
    import time
    N, K, O = GEMM_PROBE
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(N, K, generator=g), torch.randn(O, K, generator=g), torch.randn(O, generator=g)
    times = {"minift": [], "torch": []}
    for rep in range(7):
        for name in ("minift", "torch"):
            torch.ops.minift.gemm_backend(name)
            t0 = time.perf_counter()
            torch.ops.minift.gemm(x, w, False, True, b)
            if rep >= 2:                                          # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    own, theirs = (statistics.median(times[k]) for k in ("minift", "torch"))
    backend = "minift" if theirs >= 1.1 * own else "torch"
    flops = 2 * N * K * O
    return backend, (f"auto: a {N}x{K} by {K}x{O} product took {own * 1e3:.2f} ms with minift's "
                     f"({flops / own / 1e9:.0f} GFLOP/s), {theirs * 1e3:.2f} ms with torch's "
                     f"({flops / theirs / 1e9:.0f} GFLOP/s) on {torch.get_num_threads()} threads")


def linear(x, weight, bias=None):
    """y = x W^T + b. On the CPU in float32 (no autocast) through minift's own matrix multiply where
    ``gemm_backend()`` chose it, forward and backward (dx = dy W, dW = dy^T x, db = the column sums of
    dy: csrc/linear.cpp); elsewhere F.linear."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or (bias is not None and bias.dtype != torch.float32) or torch.is_autocast_enabled("cpu")
            or (_state.gemm or gemm_backend()) != "minift" or why_not_compiled("linear_fwd", x) is not None):
        return F.linear(x, weight, bias)
    return torch.ops.minift.linear_fwd(x, weight, bias)


def packed_attention_runs(t: torch.Tensor) -> bool:
    """Whether the compiled packed attention runs for activations like t (the CPU kernel), no warning."""
    return why_not_compiled("attention_packed_fwd", t) is None


def fused_dropout(x, p: float, training: bool = True, generator=None):
    """Inverted dropout with Philox bits, drawn in parallel: the same result as F.dropout in
    distribution, several times faster on the CPU (PyTorch draws its mask on one thread), and the
    same mask on the CPU and the GPU for the same seed."""
    if not training or p <= 0.0:
        return x
    if not use_compiled("dropout_fwd", x, "fused_dropout"):
        return F.dropout(x, p, training=True)
    y, _ = torch.ops.minift.dropout_fwd(x.contiguous(), float(p), _seed(p, generator), 0)
    return y


def adamw_step_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """One AdamW update of a parameter in place, in one pass over memory (CPU float32/float64, CUDA
    float32 in a CUDA build); elsewhere the same update in plain PyTorch ops
    (``minift.functional.adamw_update_``, the loop of ``minift.optim.AdamW``)."""
    if not use_compiled("adamw_step_", param, "adamw_step_"):
        adamw_update_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step)
        return
    torch.ops.minift.adamw_step_(param, grad.contiguous(), exp_avg, exp_avg_sq, float(lr), float(beta1),
                                 float(beta2), float(eps), float(weight_decay), int(step))


def add_layer_norm(y, x, weight, bias, eps: float = 1e-12, dropout_p: float = 0.0, training: bool = True,
                   generator=None):
    """LayerNorm(dropout(y) + x) over the last dim in one pass (the post-LN residual of BertSelfOutput
    and BertOutput), and its backward in one pass: dy, dx and the weight and bias gradients. The dropout
    draws its mask from the Philox stream of ``fused_dropout`` (element n of y is kept by the same bits),
    seeded from torch's generator. y, x (..., H) and weight, bias (H,); their dtypes may differ, as
    autocast makes them (a bfloat16 y from the matmul, the float32 residual x and parameters): the
    kernel computes in float32 and returns the promoted dtype of y and x, as the PyTorch ops do. CPU
    only; elsewhere the same in PyTorch ops."""
    p = float(dropout_p) if training else 0.0
    if not use_compiled("add_layer_norm_fwd", y, "add_layer_norm"):
        z = (F.dropout(y, p, training=True) if p > 0.0 else y) + x
        return F.layer_norm(z, (y.shape[-1],), weight, bias, eps)
    out, *_ = torch.ops.minift.add_layer_norm_fwd(y.contiguous(), x.contiguous(), weight.contiguous(),
                                                  bias.contiguous(), float(eps), p, _seed(p, generator), 0)
    return out


def bias_gelu(h, bias):
    """GELU(h + bias) (erf form) with h the matmul output without its bias (BertIntermediate): the
    forward saves the pre-activation, the backward gives dh and the bias gradient (its column sum) in
    one pass. The result has h's dtype (under autocast h is the matmul's bfloat16 output, the bias
    float32: the kernel computes in float32 and rounds once, and the next matmul reads bfloat16).
    CPU only; elsewhere F.gelu(h + bias) in h's dtype."""
    if not use_compiled("bias_gelu_fwd", h, "bias_gelu"):
        return F.gelu(h + bias).to(h.dtype)
    out, _ = torch.ops.minift.bias_gelu_fwd(h.contiguous(), bias.contiguous())
    return out


def attention_with_lse(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, seed=0, offset=0):
    """The raw forward op: (O, row log-sum-exp), with an explicit Philox seed and offset."""
    _require_extension("attention_with_lse")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    keep = key_padding_keep(key_padding_mask)
    mask = None if keep is None else keep.contiguous()
    return torch.ops.minift.attention_fwd(_attention_layout(q), _attention_layout(k), _attention_layout(v), mask,
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
    divides the sum by sum_n w_{y_n} over the rows not ignored. It gets no gradient, and must be
    finite and >= 0 (minift.functional.check_class_weight). The CUDA kernels take no weight: a
    weighted call on the GPU runs F.cross_entropy (the dispatch rule, with its one warning)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"softmax_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    check_class_weight(weight, logits, "softmax_cross_entropy", values=False)    # the kernel checks the values
    uses = () if weight is None else ("weight",)
    if not use_compiled("xent_fwd", logits, "softmax_cross_entropy", uses):
        check_class_weight(weight, logits, "softmax_cross_entropy")   # F.cross_entropy takes negative weights
        return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction=reduction)
    loss, _ = torch.ops.minift.xent_fwd(logits.contiguous(), target.contiguous(),
                                        None if weight is None else weight.contiguous(), int(ignore_index),
                                        float(label_smoothing), _reduction_code(reduction))
    return loss
