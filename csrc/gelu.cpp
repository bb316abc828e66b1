// Bias + GELU of BertIntermediate on the CPU, fused: out = GELU(h + b), h the matmul's output without bias.
//
// Forward, elementwise over rows of I features (GELU in its erf form, as BERT and Hugging Face use):
//   pre_j = h_j + b_j,   out_j = pre_j Phi(pre_j),   Phi(x) = (1 + erf(x / sqrt 2)) / 2
// It saves pre for the backward (the same memory as saving GELU's input).
// Backward, in one pass over dout and pre (derivation in minift/functional.py, bias_gelu_backward):
//   dpre_j = dout_j (Phi(pre_j) + pre_j phi(pre_j)),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//   dh = dpre,   db_j = sum_n dpre_nj
// In float, Phi and phi share one exponential (gelu_cdf_pdf): exp(-x^2 / 2) is inside erf too.
// The column sum db is taken as in layer_norm.cpp: fixed blocks of rows, each into its own partial
// row, added in block order (the same result on any thread count).
// float32 and float64 compute in their own type; float16 and bfloat16 in float32 (pre is then kept in
// float32), read and rounded back a row at a time. h and the bias may differ in dtype, as autocast
// makes them (the matmul's bfloat16 output, a float32 bias): out and dh take h's dtype; the backward
// op returns dbias in the compute dtype, and the autograd node rounds it to the bias' dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_vec.h"

namespace minift {

constexpr int64_t kGeluChunks = 32;   // row blocks of the column sum db

// TH: h's and out's type, T or (under autocast, T = float) bfloat16/float16, converted a row at a time.
template <typename T, typename TH>
static void bias_gelu_fwd_kernel(const TH* h, const T* b, TH* out, T* pre, int64_t N, int64_t I) {
  constexpr bool same = std::is_same_v<T, TH>;
  const T inv_sqrt2 = (T)M_SQRT1_2;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    const Vec<T> vhalf(T(0.5)), vone(T(1)), vis2(inv_sqrt2);
    std::vector<T> hbuf(same ? 0 : I), obuf(same ? 0 : I);              // h's and out's row as T
    for (int64_t n = begin; n < end; ++n) {
      const T* hr = row_as<T>(h + n * I, hbuf.data(), I);
      T* pr = pre + n * I;
      T* orow;
      if constexpr (same) orow = out + n * I; else orow = obuf.data();
      int64_t j = 0;
      for (; j + Vec<T>::size() <= I; j += Vec<T>::size()) {
        const Vec<T> x = Vec<T>::loadu(hr + j) + Vec<T>::loadu(b + j);          // pre = h + b
        x.store(pr + j);
        (x * vhalf * (vone + (x * vis2).erf())).store(orow + j);               // pre Phi(pre)
      }
      for (; j < I; ++j) {
        const T x = hr[j] + b[j];
        pr[j] = x;
        orow[j] = x * T(0.5) * (T(1) + std::erf(x * inv_sqrt2));
      }
      if constexpr (!same) store_row(orow, out + n * I, I);
    }
  });
}

// Phi(x) and phi(x) of one vector sharing a single exponential (float): erf by the polynomial that
// at::vec::Vectorized<float>::erf uses (Abramowitz and Stegun 7.1.26, |error| < 1.5e-7):
//   z = x / sqrt 2,  t = 1 / (1 + p |z|),  erf(z) = sign(z) (1 - t r(t) exp(-z^2)),
// and exp(-z^2) = exp(-x^2 / 2) is also the Gaussian density's exponential, phi(x) = exp(-x^2/2) / sqrt(2 pi).
// Computing erf and then exp(-x^2 / 2) again, as erf() and exp() separately do, spends two of the
// three transcendental steps per element on the same number. double keeps Sleef's erf (1 ulp):
// the polynomial's 1.5e-7 would be far below float64's precision.
static inline void gelu_cdf_pdf(const Vec<float>& x, Vec<float>& cdf, Vec<float>& pdf) {
  const Vec<float> one(1.f), half(0.5f), is2(float(M_SQRT1_2)), inv_sqrt_2pi(float(0.5 * M_2_SQRTPI * M_SQRT1_2));
  const Vec<float> p(0.3275911f), p1(0.254829592f), p2(-0.284496736f), p3(1.421413741f), p4(-1.453152027f),
      p5(1.061405429f);
  const Vec<float> z = x * is2, a = z.abs();
  const Vec<float> t = one / at::vec::fmadd(p, a, one);
  const Vec<float> r = at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(p5, t, p4), t, p3), t, p2), t, p1);
  const Vec<float> e = (Vec<float>(0.f) - z * z).exp();                       // exp(-z^2) = exp(-x^2 / 2)
  const Vec<float> erf_abs = one - t * r * e;                               // erf(|z|)
  const Vec<float> erf = Vec<float>::blendv(erf_abs, Vec<float>(0.f) - erf_abs, z < Vec<float>(0.f));
  cdf = half * (one + erf);
  pdf = e * inv_sqrt_2pi;
}

// TD: dout's and dh's type, T or (under autocast, T = float) bfloat16/float16, converted a row at a time.
template <typename T, typename TD>
static void bias_gelu_bwd_kernel(const TD* dout, const T* pre, TD* dh, T* db, int64_t N, int64_t I) {
  constexpr bool same = std::is_same_v<T, TD>;
  const T inv_sqrt2 = (T)M_SQRT1_2, inv_sqrt_2pi = (T)(0.5 * M_2_SQRTPI * M_SQRT1_2);
  const int64_t chunks = std::min(kGeluChunks, N), rows = (N + chunks - 1) / chunks;
  std::vector<T> partial(chunks * I, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const Vec<T> vhalf(T(0.5)), vone(T(1)), vis2(inv_sqrt2), vmhalf(T(-0.5)), vpdf(inv_sqrt_2pi);
    std::vector<T> dbuf(same ? 0 : I), hbuf(same ? 0 : I);              // dout's and dh's row as T
    for (int64_t c = c0; c < c1; ++c) {
      T* pb = partial.data() + c * I;
      for (int64_t n = c * rows; n < std::min(N, (c + 1) * rows); ++n) {
        const T *dr = row_as<T>(dout + n * I, dbuf.data(), I), *pr = pre + n * I;
        T* dhr;
        if constexpr (same) dhr = dh + n * I; else dhr = hbuf.data();
        int64_t j = 0;
        for (; j + Vec<T>::size() <= I; j += Vec<T>::size()) {
          const Vec<T> x = Vec<T>::loadu(pr + j);
          Vec<T> cdf, pdf;                                                    // Phi(x), phi(x)
          if constexpr (std::is_same_v<T, float>) {
            gelu_cdf_pdf(x, cdf, pdf);
          } else {
            cdf = vhalf * (vone + (x * vis2).erf());
            pdf = (vmhalf * x * x).exp() * vpdf;
          }
          const Vec<T> d = Vec<T>::loadu(dr + j) * (cdf + x * pdf);           // dpre = dout (Phi + x phi)
          d.store(dhr + j);
          (Vec<T>::loadu(pb + j) + d).store(pb + j);                          // db += dpre
        }
        for (; j < I; ++j) {
          const T x = pr[j];
          const T d = dr[j] * (T(0.5) * (T(1) + std::erf(x * inv_sqrt2)) + x * std::exp(T(-0.5) * x * x) * inv_sqrt_2pi);
          dhr[j] = d;
          pb[j] += d;
        }
        if constexpr (!same) store_row(dhr, dh + n * I, I);
      }
    }
  });
  for (int64_t j = 0; j < I; ++j) {                                  // the partials, in block order
    T s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[c * I + j];
    db[j] = s;
  }
}

// h and bias may differ in dtype (autocast: the matmul's bfloat16 output, a float32 bias). Computes
// in float32 (float64 if either is float64), reading and writing a bfloat16/float16 h row by row.
// Returns out (in h's dtype: the next matmul reads it, as it would GELU(linear(x, W, b)) under
// autocast) and pre (in the compute dtype).
std::tuple<at::Tensor, at::Tensor> bias_gelu_fwd_cpu(const at::Tensor& h, const at::Tensor& bias) {
  TORCH_CHECK(h.device().is_cpu(), "bias_gelu: expected h on the CPU, got ", h.device());
  check_floating(h, "bias_gelu h");
  TORCH_CHECK(h.dim() >= 1 && h.numel() > 0, "bias_gelu: expected a non-empty h (..., I), got ", h.sizes());
  TORCH_CHECK(h.is_contiguous(), "bias_gelu: expected a contiguous h (call .contiguous()), got strides ", h.strides());
  const int64_t I = h.size(-1), N = h.numel() / I;
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == I && at::isFloatingType(bias.scalar_type()) && bias.is_contiguous() &&
                  bias.device() == h.device(),
              "bias_gelu: expected a contiguous floating bias of shape (", I, ",) on ", h.device(), ", got ",
              bias.sizes(), " ", bias.scalar_type(), " on ", bias.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto C = compute_dtype({&h, &bias});
  auto bc = as_dtype(bias, C);
  auto pre = maybe_poison(at::empty(h.sizes(), h.options().dtype(C)));
  if (C == at::kFloat && is_reduced(h)) {                              // h and out a row at a time
    auto out = maybe_poison(at::empty_like(h));
    AT_DISPATCH_REDUCED_FLOATING_TYPES(h.scalar_type(), "bias_gelu_fwd_cpu", [&] {
      bias_gelu_fwd_kernel<float>(h.data_ptr<scalar_t>(), bc.data_ptr<float>(), out.data_ptr<scalar_t>(),
                                  pre.data_ptr<float>(), N, I);
    });
    return {out, pre};
  }
  auto hc = as_dtype(h, C);
  auto out = maybe_poison(at::empty_like(pre));
  AT_DISPATCH_FLOATING_TYPES(C, "bias_gelu_fwd_cpu", [&] {
    bias_gelu_fwd_kernel<scalar_t>(hc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                   pre.data_ptr<scalar_t>(), N, I);
  });
  return {as_dtype(out, h.scalar_type()), pre};
}

// dout in any floating dtype (out's); pre as the forward saved it. Returns dh in dout's dtype and
// dbias in pre's (the compute dtype): the autograd node rounds it to the bias' dtype.
std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& dout, const at::Tensor& pre) {
  TORCH_CHECK(dout.device().is_cpu(), "bias_gelu backward: expected dout on the CPU, got ", dout.device());
  check_floating(dout, "bias_gelu backward dout");
  TORCH_CHECK(dout.sizes() == pre.sizes() && dout.is_contiguous() && pre.is_contiguous() &&
                  (pre.scalar_type() == at::kFloat || pre.scalar_type() == at::kDouble),
              "bias_gelu backward: expected contiguous dout and pre of one shape, pre in float32 or float64 (the "
              "compute dtype); got ", dout.sizes(), " ", dout.scalar_type(), " and ", pre.sizes(), " ",
              pre.scalar_type());
  const int64_t I = pre.size(-1), N = pre.numel() / I;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto C = pre.scalar_type();
  auto db = maybe_poison(at::empty({I}, pre.options()));
  if (C == at::kFloat && is_reduced(dout)) {                           // dout and dh a row at a time
    auto dh = maybe_poison(at::empty_like(dout));
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dout.scalar_type(), "bias_gelu_bwd_cpu", [&] {
      bias_gelu_bwd_kernel<float>(dout.data_ptr<scalar_t>(), pre.data_ptr<float>(), dh.data_ptr<scalar_t>(),
                                  db.data_ptr<float>(), N, I);
    });
    return {dh, db};
  }
  auto dc = as_dtype(dout, C);
  auto dh = maybe_poison(at::empty_like(pre));
  AT_DISPATCH_FLOATING_TYPES(C, "bias_gelu_bwd_cpu", [&] {
    bias_gelu_bwd_kernel<scalar_t>(dc.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>(), dh.data_ptr<scalar_t>(),
                                   db.data_ptr<scalar_t>(), N, I);
  });
  return {as_dtype(dh, dout.scalar_type()), db};
}

TORCH_LIBRARY_IMPL(minift, CPU, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cpu);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cpu);
}

}  // namespace minift
