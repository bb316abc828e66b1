// Fused softmax cross-entropy on the CPU, one row of logits per task of at::parallel_for.
//
// Forward, row n with target y (label smoothing eps, C classes):
//   m = max_c z_c,  lse = m + log sum_c exp(z_c - m)     (stable for |z| = 1e4)
//   loss_n = (1 - eps)(lse - z_y) + eps (lse - mean_c z_c),   0 when y = ignore_index
// Backward, given g_n = dL/dloss_n (the reduction's weight times the incoming gradient):
//   dz_c = (exp(z_c - lse) - eps/C - (1 - eps)[c = y]) * g_n,   0 for ignored rows
// One read of the logits in each pass, one write of the gradient. float32 and float64 rows go
// through the SIMD helpers of cpu_vec.h; float16 and bfloat16 rows are widened element by element.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>

#include "checks.h"
#include "cpu_vec.h"

namespace minift {

template <typename T> struct XAcc { using type = float; };
template <> struct XAcc<double> { using type = double; };

template <typename scalar_t>
static void xent_fwd_kernel(const scalar_t* z, const int64_t* target, typename XAcc<scalar_t>::type* loss,
                            typename XAcc<scalar_t>::type* lse, int64_t N, int64_t C, int64_t ignore_index,
                            double eps) {
  using acc_t = typename XAcc<scalar_t>::type;
  std::atomic<int64_t> first_bad{N};                                 // the first row with a bad target
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t y = target[n];
      if (y != ignore_index && (y < 0 || y >= C)) {
        int64_t seen = first_bad.load();
        while (n < seen && !first_bad.compare_exchange_weak(seen, n)) {
        }
        continue;
      }
      const scalar_t* row = z + n * C;
      acc_t m = -std::numeric_limits<acc_t>::infinity(), sum_z = 0, s = 0;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        m = row_max(row, C);
        if (eps > 0) sum_z = row_sum(row, C);
        s = row_exp_sum_only(row, C, m);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          acc_t x = (acc_t)row[c];
          m = x > m ? x : m;
          sum_z += x;
        }
        for (int64_t c = 0; c < C; ++c) s += std::exp((acc_t)row[c] - m);
      }
      const acc_t l = m + std::log(s);                               // lse = m + log sum exp(z - m)
      lse[n] = l;
      if (y == ignore_index) { loss[n] = 0; continue; }
      loss[n] = (acc_t)(1.0 - eps) * (l - (acc_t)row[y]) + (acc_t)eps * (l - sum_z / (acc_t)C);
    }
  });
  const int64_t bad = first_bad.load();
  TORCH_CHECK(bad == N, "softmax_cross_entropy: expected targets in [0, ", C, ") or ignore_index ", ignore_index,
              ", got ", bad < N ? target[bad] : 0, " at row ", bad);
}

template <typename scalar_t>
static void xent_bwd_kernel(const typename XAcc<scalar_t>::type* g, const scalar_t* z, const int64_t* target,
                            const typename XAcc<scalar_t>::type* lse, scalar_t* dz, int64_t N, int64_t C,
                            int64_t ignore_index, double eps) {
  using acc_t = typename XAcc<scalar_t>::type;
  const acc_t smooth = (acc_t)(eps / (double)C), hit = (acc_t)(1.0 - eps);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t y = target[n];
      scalar_t* out = dz + n * C;
      if (y == ignore_index) {
        for (int64_t c = 0; c < C; ++c) out[c] = (scalar_t)0;
        continue;
      }
      const scalar_t* row = z + n * C;
      const acc_t gn = g[n], l = lse[n];
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        row_softmax_minus(row, out, C, l, smooth, gn);               // (softmax_c - eps/C) g_n
        out[y] -= hit * gn;                                          // - (1 - eps) g_n at the target
      } else {
        for (int64_t c = 0; c < C; ++c) {
          acc_t p = std::exp((acc_t)row[c] - l);                     // softmax_c
          out[c] = (scalar_t)((p - smooth - (c == y ? hit : (acc_t)0)) * gn);  // (p - q) g_n
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> xent_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                int64_t ignore_index, double label_smoothing) {
  check_xent_inputs(logits, target, label_smoothing, at::kCPU);
  const int64_t N = logits.size(0), C = logits.size(1);
  auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = maybe_poison(at::empty({N}, logits.options().dtype(acc)));
  auto lse = maybe_poison(at::empty({N}, logits.options().dtype(acc)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "xent_fwd_cpu", [&] {
    using acc_t = typename XAcc<scalar_t>::type;
    xent_fwd_kernel<scalar_t>(logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(), loss.data_ptr<acc_t>(),
                              lse.data_ptr<acc_t>(), N, C, ignore_index, label_smoothing);
  });
  return {loss, lse};
}

at::Tensor xent_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                        const at::Tensor& lse, int64_t ignore_index, double label_smoothing) {
  check_xent_inputs(logits, target, label_smoothing, at::kCPU);
  const int64_t N = logits.size(0), C = logits.size(1);
  auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == N && grad_rows.scalar_type() == acc &&
                  grad_rows.is_contiguous() && grad_rows.device() == logits.device(),
              "softmax_cross_entropy backward: expected grad_rows of shape (", N, ") and dtype ", acc, ", got ",
              grad_rows.sizes(), " ", grad_rows.scalar_type());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == N && lse.scalar_type() == acc && lse.is_contiguous(),
              "softmax_cross_entropy backward: expected lse of shape (", N, ") and dtype ", acc, ", got ",
              lse.sizes(), " ", lse.scalar_type());
  auto dz = maybe_poison(at::empty_like(logits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "xent_bwd_cpu", [&] {
    using acc_t = typename XAcc<scalar_t>::type;
    xent_bwd_kernel<scalar_t>(grad_rows.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(),
                              lse.data_ptr<acc_t>(), dz.data_ptr<scalar_t>(), N, C, ignore_index, label_smoothing);
  });
  return dz;
}

TORCH_LIBRARY_IMPL(minift, CPU, m) {
  m.impl("xent_fwd", &xent_fwd_cpu);
  m.impl("xent_bwd", &xent_bwd_cpu);
}

}  // namespace minift
