// AdamW's update as one pass over memory (CPU), for minift.optim.AdamW(fused=True).
//
// The Python loop in minift/optim.py makes eight passes over each parameter's memory (lerp, mul,
// addcmul, div, sqrt, mul, add, addcdiv). Here every element is read once and written once:
//   m = b1 m + (1-b1) g,   v = b2 v + (1-b2) g^2
//   theta = theta (1 - lr wd) - (lr / (1-b1^t)) m / (sqrt(v / (1-b2^t)) + eps)
// in the same order of operations as the Python version (and as PyTorch's addcmul/addcdiv
// kernels evaluate theirs), on SIMD vectors (cpu_vec.h), so the two agree to the last bit or so.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "cpu_vec.h"

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

TORCH_LIBRARY_IMPL(minift, CPU, m) {
  m.impl("adamw_step_", &adamw_step_cpu);
}

}  // namespace minift
