// The elementwise CPU kernels: AdamW's update in one pass, and dropout with the Philox stream that
// the attention kernels draw their dropout from (the CUDA versions are in cuda/elementwise.cu).
//
// AdamW, for minift.optim.AdamW(fused=True). The Python loop in minift/optim.py makes eight passes
// over each parameter's memory (lerp, mul, addcmul, div, sqrt, mul, add, addcdiv). Here every
// element is read once and written once:
//   m = b1 m + (1-b1) g,   v = b2 v + (1-b2) g^2
//   theta = theta (1 - lr wd) - (lr / (1-b1^t)) m / (sqrt(v / (1-b2^t)) + eps)
// in the same order of operations as the Python version (and as PyTorch's addcmul/addcdiv
// kernels evaluate theirs), on SIMD vectors (cpu_vec.h), so the two agree to the last bit or so.
//
// Dropout: element n of x is kept when the Philox bits of element n of (seed, offset) are
// >= p 2^32 (philox.h), the rule of every minift dropout on either device, so a seed gives the same
// mask on the CPU and the GPU.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "checks.h"
#include "cpu_vec.h"
#include "philox.h"

namespace minift {

// The scalars are formed in double and rounded once, as the Python loop's are.
template <typename T>
static void adamw_kernel(T* p, const T* g, T* m, T* v, int64_t n, double lr, double beta1, double beta2, double eps_d,
                         double wd, int64_t step) {
  const T b1c = (T)(1.0 - beta1), b2 = (T)beta2, b2c = (T)(1.0 - beta2), eps = (T)eps_d;
  const T bc2 = (T)(1.0 - std::pow(beta2, (double)step));
  const T inv_bc2 = T(1) / bc2;                   // PyTorch divides by a scalar as a product with its inverse
  const T step_size = (T)(-lr * (1.0 / (1.0 - std::pow(beta1, (double)step))));
  const T decay = (T)(1.0 - lr * wd);
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    const Vec<T> vb1c(b1c), vb2(b2), vb2c(b2c), vinv_bc2(inv_bc2), veps(eps), vdecay(decay), vstep(step_size);
    int64_t i = begin;
    for (; i + Vec<T>::size() <= end; i += Vec<T>::size()) {
      const Vec<T> gi = Vec<T>::loadu(g + i);
      Vec<T> mi = Vec<T>::loadu(m + i), vi = Vec<T>::loadu(v + i), pi = Vec<T>::loadu(p + i);
      mi = mi + (gi - mi) * vb1c;                                   // m = b1 m + (1-b1) g
      vi = vi * vb2 + vb2c * gi * gi;                               // v = b2 v + (1-b2) g^2
      const Vec<T> denom = (vi * vinv_bc2).sqrt() + veps;           // sqrt(vhat) + eps
      pi = pi * vdecay;                                             // - eta lambda theta
      pi = pi + vstep * mi / denom;                                 // - eta mhat / (sqrt(vhat) + eps)
      mi.store(m + i);
      vi.store(v + i);
      pi.store(p + i);
    }
    for (; i < end; ++i) {
      m[i] = m[i] + (g[i] - m[i]) * b1c;
      v[i] = v[i] * b2 + b2c * g[i] * g[i];
      const T denom = std::sqrt(v[i] * inv_bc2) + eps;
      p[i] = p[i] * decay;
      p[i] = p[i] + step_size * m[i] / denom;
    }
  });
}

void adamw_step_cpu(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg, at::Tensor exp_avg_sq, double lr,
                    double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  TORCH_CHECK(param.device().is_cpu(), "adamw_step_: expected CPU tensors, got ", param.device());
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble,
              "adamw_step_: expected float32 or float64 parameters, got ", param.scalar_type());
  TORCH_CHECK(param.is_contiguous(), "adamw_step_: expected a contiguous param, got strides ", param.strides());
  check_same_layout(grad, param, "grad", "param");
  check_same_layout(exp_avg, param, "exp_avg", "param");
  check_same_layout(exp_avg_sq, param, "exp_avg_sq", "param");
  TORCH_CHECK(step >= 1, "adamw_step_: expected step >= 1, got ", step);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "adamw_step_cpu", [&] {
    adamw_kernel<scalar_t>(param.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), exp_avg.data_ptr<scalar_t>(),
                           exp_avg_sq.data_ptr<scalar_t>(), param.numel(), lr, beta1, beta2, eps, weight_decay, step);
  });
}

// The keep mask the kernels draw, as a tensor (B, H, Tq, Tk): for tests and teaching only.
at::Tensor dropout_mask_cpu(const at::Tensor& like, int64_t B, int64_t H, int64_t Tq, int64_t Tk, double p,
                            int64_t seed, int64_t offset) {
  TORCH_CHECK(p >= 0 && p < 1, "dropout_mask: expected 0 <= p < 1, got ", p);
  TORCH_CHECK(B >= 0 && H >= 0 && Tq >= 0 && Tk >= 0, "dropout_mask: expected non-negative sizes");
  auto keep = at::empty({B, H, Tq, Tk}, like.options().dtype(at::kBool));
  bool* kp = keep.data_ptr<bool>();
  const uint32_t threshold = dropout_threshold((float)p);
  at::parallel_for(0, B * H * Tq * Tk, 4096, [&](int64_t begin, int64_t end) {
    for_each_keep((uint64_t)seed, (uint64_t)offset, (uint64_t)begin, end - begin, threshold,
                  [&](int64_t j, bool keep) { kp[begin + j] = keep; });
  });
  return keep;
}

// Inverted dropout of any tensor with the same Philox stream: element n of x is kept when the bits
// of element n of (seed, offset) are >= p 2^32; y = x / (1 - p) there, 0 elsewhere. Returns (y, keep).
std::tuple<at::Tensor, at::Tensor> dropout_fwd_cpu(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(p >= 0 && p < 1, "dropout: expected 0 <= p < 1, got ", p);
  check_floating(x, "dropout x");
  TORCH_CHECK(x.is_contiguous(), "dropout: expected a contiguous x (call .contiguous()), got strides ", x.strides());
  auto y = maybe_poison(at::empty_like(x));
  auto keep = at::empty_like(x, x.options().dtype(at::kBool));
  bool* kp = keep.data_ptr<bool>();
  const uint32_t threshold = dropout_threshold((float)p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_fwd_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t scale = acc_t(1) / (acc_t(1) - (acc_t)p);
    at::parallel_for(0, x.numel(), 16384, [&](int64_t begin, int64_t end) {
      for_each_keep((uint64_t)seed, (uint64_t)offset, (uint64_t)begin, end - begin, threshold,
                    [&](int64_t j, bool keep) {
                      kp[begin + j] = keep;
                      yp[begin + j] = keep ? (scalar_t)((acc_t)xp[begin + j] * scale) : (scalar_t)0;
                    });
    });
  });
  return {y, keep};
}

TORCH_LIBRARY_IMPL(minift, CPU, m) {
  m.impl("dropout_fwd", &dropout_fwd_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
  m.impl("adamw_step_", &adamw_step_cpu);
}

}  // namespace minift
