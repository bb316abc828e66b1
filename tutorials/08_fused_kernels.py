# %% [markdown]
# # Tutorial 8: writing fused kernels: softmax cross-entropy and attention
#
# PyTorch computes a loss as a chain of ops, each reading its input from memory and writing its
# output back. For the cross-entropy of N rows over a vocabulary of C = 30,522, that is several
# passes over an N x C array. A *fused* kernel does the whole chain in one pass per row. This
# tutorial writes one in C++ (compiled on the spot with `torch.utils.cpp_extension.load_inline`),
# checks it, then derives the *online softmax* that lets attention run without storing its
# T x T matrix, and finally times minift's compiled kernels against PyTorch.
#
# The production versions are in csrc/cross_entropy.cpp, csrc/attention.cpp (CPU: blocked
# matrix multiplies and SIMD rows) and csrc/cuda/attention_v1.cu (GPU, one warp per query row, the same
# online softmax).

# %%
import math
import os
import time

import torch
import torch.nn.functional as F

from minift import ops

FAST = os.environ.get("MINIFT_TUTORIAL_FAST") == "1"

# %% [markdown]
# ## Version 1: the cross-entropy in C++
# Per row: m = max z, lse = m + log sum exp(z - m), loss = lse - z_y; and the gradient
# (softmax - onehot) / N, written in the same loop. Two reads of the row (max, then sum), one
# write: the row stays in cache between them.

# %%
cpp_source = r"""
#include <ATen/core/Tensor.h>    // the tensor type, and the two operators used below, one header
#include <ATen/ops/zeros.h>      // each (<ATen/ATen.h> declares all of ATen's 1,300-odd operators:
#include <ATen/ops/empty_like.h> // 23 s to compile this file with it, 20 s without, on a 2-core CPU)
#include <torch/library.h>      // TORCH_LIBRARY: registers the function as an operator, torch.ops.tutorial8.*
#include <cmath>
#include <vector>

std::vector<at::Tensor> xent_v1(const at::Tensor& z, const at::Tensor& y) {
  TORCH_CHECK(z.dim() == 2 && z.scalar_type() == at::kDouble && z.is_contiguous(), "expected (N, C) float64");
  const int64_t N = z.size(0), C = z.size(1);
  auto loss = at::zeros({}, z.options());
  auto grad = at::empty_like(z);
  const double* zp = z.data_ptr<double>();
  const int64_t* yp = y.data_ptr<int64_t>();
  double* gp = grad.data_ptr<double>();
  double total = 0;
  for (int64_t n = 0; n < N; ++n) {
    const double* row = zp + n * C;
    double m = -INFINITY;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, row[c]);          // pass 1: max
    double s = 0;
    for (int64_t c = 0; c < C; ++c) s += std::exp(row[c] - m);        // pass 2: sum of exp
    const double lse = m + std::log(s);
    total += lse - row[yp[n]];
    for (int64_t c = 0; c < C; ++c)                                   // the gradient, same loop order
      gp[n * C + c] = (std::exp(row[c] - lse) - (c == yp[n] ? 1.0 : 0.0)) / N;
  }
  loss.fill_(total / N);
  return {loss, grad};
}

TORCH_LIBRARY(tutorial8, m) { m.def("xent_v1", &xent_v1); }   // the schema is read off the C++ signature
"""
from torch.utils.cpp_extension import load_inline

build_dir = os.path.join(os.path.expanduser("~"), ".cache", "minift", "tutorial8")
os.makedirs(build_dir, exist_ok=True)
t0 = time.time()
# is_python_module=False: the library is loaded for its TORCH_LIBRARY registration alone, with no
# Python bindings; no_implicit_headers: only the headers the source names are compiled (ATen's,
# not torch/extension.h with pybind11 and all of libtorch's C++ API: a third of the compile time)
load_inline(name="tutorial8_xent", cpp_sources=cpp_source, is_python_module=False, no_implicit_headers=True,
            extra_cflags=["-O2"], build_directory=build_dir, verbose=False)
ext = torch.ops.tutorial8
print(f"compiled in {time.time() - t0:.0f} s")

g = torch.Generator().manual_seed(0)
z = torch.randn(64, 1000, generator=g, dtype=torch.float64) * 4
y = torch.randint(0, 1000, (64,), generator=g)
loss, grad = ext.xent_v1(z, y)
zg = z.clone().requires_grad_()
ref = F.cross_entropy(zg, y)
(ref_grad,) = torch.autograd.grad(ref, zg)
print(f"version 1 vs F.cross_entropy: loss {abs(loss - ref).item():.1e}, gradient {(grad - ref_grad).abs().max():.1e}")
assert abs(loss - ref).item() < 1e-12 and (grad - ref_grad).abs().max() < 1e-12

# %% [markdown]
# minift's kernel (csrc/cross_entropy.cpp) grows from this one: the rows run in parallel
# (`at::parallel_for`), float16/bfloat16 inputs accumulate in float32, ignore_index and label
# smoothing are handled, the mean or sum is taken inside the op, and the gradient is computed in
# the backward (so that any incoming gradient works). csrc/autograd.cpp connects the two: it
# tells PyTorch's autograd that the gradient of `xent_fwd` comes from `xent_bwd`. On the GPU
# (csrc/cuda/xent.cu) a warp, or for long rows a whole thread block, takes a row and keeps the
# online max and sum of the next section, so the row is read once.

# %% [markdown]
# ## The online softmax
# Attention needs softmax(s) over a row of T scores, then sum_j p_j v_j. The plain way stores the
# row. The online way streams the scores once, keeping a running max m, a running sum l and a
# running output acc, and rescales them whenever the max grows:
#
#     m' = max(m, s_j);  l' = l e^{m - m'} + e^{s_j - m'};  acc' = acc e^{m - m'} + e^{s_j - m'} v_j
#
# At the end, out = acc / l. Nothing of size T is kept: this is what makes FlashAttention's memory
# O(T) instead of O(T^2). It is the loop of minift's first CUDA kernel (csrc/cuda/attention_v1.cu, one
# warp per query row), and of the tensor-core kernel (csrc/cuda/attention_v3.cu), which runs it on
# 64 keys at a time: the scores of 16 rows against 64 keys come out of the matrix instruction in
# registers whose rows each thread knows, so m, l and acc are rescaled where they lie. (An earlier
# version used an API whose fragments hide that layout, and had to walk the keys twice instead.)
# The CPU kernel keeps the idea (nothing T x T) but not this loop: it takes 64 queries at a time,
# their scores against all keys by one matrix product into a 64 x T scratch, then a plain softmax
# over each row.

# %%
def online_attention_row(q, K, V):
    m, l, acc = float("-inf"), 0.0, torch.zeros_like(V[0])
    for j in range(K.shape[0]):
        s = (q @ K[j]).item() / K.shape[1] ** 0.5
        m_new = max(m, s)
        correction = math.exp(m - m_new)                                 # e^{m - m'} (0 at the start)
        e = math.exp(s - m_new)
        l = l * correction + e
        acc = acc * correction + e * V[j]
        m = m_new
    return acc / l


q = torch.randn(16, generator=g, dtype=torch.float64)
K, V = torch.randn(50, 16, generator=g, dtype=torch.float64), torch.randn(50, 16, generator=g, dtype=torch.float64)
plain = torch.softmax(K @ q / 4, 0) @ V
streamed = online_attention_row(q, K, V)
print(f"online vs plain softmax attention: {(plain - streamed).abs().max():.1e}")
assert (plain - streamed).abs().max() < 1e-12

# %% [markdown]
# The backward needs P again. Instead of storing it, the forward saves one number per row, the
# log-sum-exp L_i = m + log l, and the backward recomputes P_ij = exp(s_ij - L_i). Check that the
# compiled kernel's saved L is exactly that:

# %%
qb, kb, vb = (torch.randn(2, 3, 9, 32, generator=g, dtype=torch.float64) for _ in range(3))
out, lse = ops.attention_with_lse(qb, kb, vb)
s = qb @ kb.transpose(-2, -1) / 32 ** 0.5
assert (lse - torch.logsumexp(s, -1)).abs().max() < 1e-12
assert (out - torch.softmax(s, -1) @ vb).abs().max() < 1e-12
print("minift's fused attention: O and the row log-sum-exp L match their definitions")

# %% [markdown]
# ## Timing against PyTorch (CPU)
# Same inputs, warm-up, the median of repeated runs, forward and backward together.

# %%
def median_ms(fn, repeats):
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


N, C = (256, 30522) if not FAST else (64, 30522)
logits = torch.randn(N, C, generator=g).requires_grad_()
target = torch.randint(0, C, (N,), generator=g)
t_torch = median_ms(lambda: F.cross_entropy(logits, target).backward(), 7)
t_fused = median_ms(lambda: ops.softmax_cross_entropy(logits, target).backward(), 7)
print(f"cross-entropy fwd+bwd ({N} x {C}, fp32): F.cross_entropy {t_torch:.1f} ms, minift fused {t_fused:.1f} ms, "
      f"ratio {t_torch / t_fused:.2f}x")

B, H, T, D = (8, 12, 128, 32) if not FAST else (2, 12, 64, 32)
qa, ka, va = (torch.randn(B, H, T, D, generator=g).requires_grad_() for _ in range(3))
mask = torch.ones(B, T, dtype=torch.bool)
mask[:, T * 3 // 4:] = False
dO = torch.randn(B, H, T, D, generator=g)
t_sdpa = median_ms(lambda: torch.autograd.backward(
    F.scaled_dot_product_attention(qa, ka, va, attn_mask=mask[:, None, None, :]), dO), 5)
t_attn = median_ms(lambda: torch.autograd.backward(ops.fused_attention(qa, ka, va, mask), dO), 5)
print(f"attention fwd+bwd (B={B} H={H} T={T} D={D}, fp32, padding mask): SDPA {t_sdpa:.1f} ms, "
      f"minift fused {t_attn:.1f} ms, ratio {t_sdpa / t_attn:.2f}x")

# %% [markdown]
# The same timings as bars (shorter is faster; the numbers are from the machine that ran this
# page, so compare within a pair, not across machines).

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), constrained_layout=True)
for ax, title, pair in ((axes[0], f"cross-entropy fwd+bwd, {N} x {C}", {"F.cross_entropy": t_torch, "minift fused": t_fused}),
                        (axes[1], f"attention fwd+bwd, B={B} H={H} T={T} D={D}", {"SDPA": t_sdpa, "minift fused": t_attn})):
    bars = ax.barh(list(pair), list(pair.values()), color=["tab:gray", "tab:blue"])
    ax.bar_label(bars, fmt="%.1f ms")
    ax.set(xlabel="median time (ms), CPU, fp32", title=title)
    ax.invert_yaxis()
plt.show()

# %% [markdown]
# ## Padding costs as much as text: packed sequences
# The key-padding mask lets attention skip padded keys, but the rest of a layer (the four
# projections, both layer norms, the feed-forward) still runs on every padded position: a batch of
# 27-token sentences padded to 128 spends 79% of that work on the pad. Packing lays the real tokens
# of all rows one after another, (N, H) with N the number of real tokens, runs the per-token work
# on those alone, and needs one op that knows where each row starts: attention with row offsets
# cu = [0, len_0, len_0 + len_1, ...] (FlashAttention calls it "varlen"). The real tokens' outputs
# are the same function as padded:

# %%
from minift.model import pack_batch

T, lengths = 12, [9, 4, 7]
pad_mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
packing = pack_batch(pad_mask.long())
print("kept positions of the flattened batch:", packing.index.tolist())
print("row offsets cu:", packing.cu.tolist())
nh, hd = 2, 16
proj = [torch.randn(3, T, nh * hd, generator=g, dtype=torch.float64) for _ in range(3)]   # Q, K, V projections
padded_out = ops.fused_attention(*[x.view(3, T, nh, hd).transpose(1, 2) for x in proj], pad_mask)
packed_out = ops.packed_attention(*[x.reshape(3 * T, nh, hd)[packing.index] for x in proj],
                                  packing.cu, packing.cu, T, T)
real_rows = padded_out.transpose(1, 2).reshape(3 * T, nh, hd)[packing.index]
assert (packed_out - real_rows).abs().max() < 1e-12
print(f"{packing.index.numel()} packed rows instead of {3 * T}: the same attention output at every real token")

# %% [markdown]
# Under impl="fused" on the CPU, `BertModel` packs a padded batch by itself: embeddings, every
# layer and the attention see the N real tokens, and `last_hidden_state` comes back (B, T, H)
# with 0 at the padded positions (transformers computes those from the pad token; the pooler,
# token tags and masked-token losses never read them; question answering, whose softmax runs over
# every position, does not pack). Attention dropout numbers its bits by padded position, so for a
# right-padded batch a packed step draws the padded step's attention mask (tests/test_packing.py);
# the other dropouts number the elements of the (N, H) activations, other bits of the same
# distribution. The measured step, padded and packed, is in benchmarks/RESULTS.md.

# %% [markdown]
# ## Discussion
# The fused cross-entropy avoids writing the N x C log-probabilities, and its row loops run on
# SIMD registers (csrc/cpu_vec.h: eight floats per AVX2 instruction, `exp` included); on the CPU
# that makes it faster than F.cross_entropy at a 30,522-word vocabulary (the ratio above; the
# measured table is in benchmarks/RESULTS.md). On a GPU, where the loss is bound by memory
# traffic, one pass over the logits is the whole game.
#
# The CPU attention kernel does not loop over (query, key) pairs one by one: for each (batch,
# head) it takes 64 query rows at a time, computes their scores against the kept keys with one
# BLAS matrix multiply, runs the softmax above on each row in SIMD registers, and multiplies by V
# with a second one. The backward does the same with five products. The scratch block is 64 x T,
# never T x T, and masked keys are left out before any arithmetic, so padded keys cost nothing
# (padded queries are another matter: the packing above).
# The CUDA kernel takes the same steps with shared memory in place of the cache.
