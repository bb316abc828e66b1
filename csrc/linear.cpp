// The linear layer on the CPU through minift's own float32 matrix multiply (cpu_sgemm.h).
//
//   forward:   y = x W^T + b                  x (N, K), W (Out, K), b (Out,), y (N, Out)
//   backward:  dx = dy W                       (N, Out) (Out, K)
//              dW = dy^T x                     (Out, N) (N, K)
//              db = sum_n dy[n, :]
//
// (From y_nj = sum_k x_nk W_jk + b_j: dy_nj/dx_nk = W_jk, dy_nj/dW_jk = x_nk, dy_nj/db_j = 1, each
// summed over the index that is not in the output.) Every product is one call of gemm below with the
// operands' transposes as flags: packing reads either layout, so no transposed copy is made.
//
// Which multiply runs is chosen at run time (minift/ops.py, gemm_backend): "minift" is the kernel of
// cpu_sgemm.h, "torch" is at::mm (PyTorch's BLAS). Other dtypes than float32 always take at::mm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "checks.h"
#include "cpu_sgemm.h"

namespace minift {

// 1: float32 products through cpu_sgemm.h; 0: through at::mm. Set by gemm_backend.
static std::atomic<int> g_own_gemm{0};

// What the build's own kernel is ("none" where it was compiled without AVX2+FMA or AVX-512).
std::string gemm_own_kernel() {
#if MINIFT_OWN_SGEMM
  return sgemm::kIsa;
#else
  return "none";
#endif
}

// gemm_backend("minift" | "torch") sets the backend, "" leaves it; returns the backend now.
std::string gemm_backend(const std::string& which) {
  TORCH_CHECK(which.empty() || which == "minift" || which == "torch",
              "gemm_backend: expected \"minift\", \"torch\" or \"\" (leave it), got \"", which, "\"");
  TORCH_CHECK(which != "minift" || MINIFT_OWN_SGEMM,
              "gemm_backend: this build has no own matrix multiply (it needs AVX2+FMA or AVX-512 at build time; "
              "MINIFT_PORTABLE=1 builds leave it out)");
  if (!which.empty()) g_own_gemm = which == "minift" ? 1 : 0;
  return g_own_gemm ? "minift" : "torch";
}

static at::Tensor gemm_cpu(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b,
                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "gemm: expected a and b on the CPU, got ", a.device(),
              " and ", b.device());
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "gemm: expected two matrices, got shapes ", a.sizes(), " and ",
              b.sizes());
  check_floating(a, "gemm a");
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "gemm: expected b of dtype ", a.scalar_type(), " like a, got ",
              b.scalar_type());
  const int64_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const int64_t kb = trans_b ? b.size(1) : b.size(0), n = trans_b ? b.size(0) : b.size(1);
  TORCH_CHECK(kb == k, "gemm: op(a) is ", m, " x ", k, " and op(b) is ", kb, " x ", n,
              ": expected op(b) to have ", k, " rows (a ", a.sizes(), trans_a ? " transposed" : "", ", b ", b.sizes(),
              trans_b ? " transposed)" : ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == a.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == n,
                "gemm: expected a bias of shape (", n, ",) and dtype ", a.scalar_type(), " on the CPU, got shape ",
                bias->sizes(), ", ", bias->scalar_type(), " on ", bias->device());
  }
#if MINIFT_OWN_SGEMM
  // Small products stay with at::mm: there the packing costs more than it saves, and MKL computes
  // a product with a few rows as dot products split across vector lanes, more accurate than any
  // tile's k-long sums (3 x 200 x 40: torch's error half of the tile's; tests/test_gemm.py).
  const bool big = m >= 32 && n >= 16 && m * n * k >= (int64_t(1) << 18);
  if (g_own_gemm && big && a.scalar_type() == at::kFloat) {
    // any strides whose rows are contiguous (the packing reads rows); others are copied once
    auto rows_ok = [](const at::Tensor& t) { return t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1)); };
    const at::Tensor ac = rows_ok(a) ? a : a.contiguous(), bc = rows_ok(b) ? b : b.contiguous();
    at::Tensor biasc = bias.has_value() ? bias->contiguous() : at::Tensor();
    at::Tensor out = maybe_poison(at::empty({m, n}, a.options()));
    sgemm::gemm(trans_a, trans_b, m, n, k, ac.data_ptr<float>(), ac.stride(0), bc.data_ptr<float>(), bc.stride(0),
                out.data_ptr<float>(), n, biasc.defined() ? biasc.data_ptr<float>() : nullptr, at::get_num_threads(), [](int64_t begin, int64_t end, const auto& f) {
                  at::parallel_for(begin, end, 1, [&](int64_t b0, int64_t b1) { f(b0, b1); });
                });
    return out;
  }
#endif
  const at::Tensor at_ = trans_a ? a.t() : a, bt = trans_b ? b.t() : b;
  return bias.has_value() ? at::addmm(*bias, at_, bt) : at::mm(at_, bt);
}

// y = x W^T + b over the last dim of x (..., K)
static at::Tensor linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1),
              "linear: expected x (..., ", weight.dim() == 2 ? weight.size(1) : -1, ") for a weight of shape (out, in) = ",
              weight.sizes(), ", got x of shape ", x.sizes());
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});
  auto sizes = x.sizes().vec();
  sizes.back() = weight.size(0);
  return gemm_cpu(x2, weight, false, true, bias).view(sizes);
}

TORCH_LIBRARY_FRAGMENT(minift, m) {
  // gemm_backend("minift" | "torch" | ""): sets (or reads) which float32 CPU matrix multiply gemm and
  // linear_fwd use; returns it. gemm_own_kernel(): what the build's own kernel is, or "none".
  m.def("gemm_backend(str which) -> str", &gemm_backend);
  m.def("gemm_own_kernel() -> str", &gemm_own_kernel);
  // C = op(a) op(b) (+ bias): op(a) = a.T when trans_a, op(b) = b.T when trans_b.
  m.def("gemm(Tensor a, Tensor b, bool trans_a, bool trans_b, Tensor? bias) -> Tensor");
  // y = x weight^T + bias over x's last dim; the backward (autograd.cpp) is two gemm calls and a sum.
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(minift, CPU, m) {
  m.impl("gemm", &gemm_cpu);
  m.impl("linear_fwd", &linear_fwd_cpu);
}

}  // namespace minift
