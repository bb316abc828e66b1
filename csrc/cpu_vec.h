// Row helpers for the CPU kernels, in SIMD registers: at::vec::Vectorized<T> holds 16 floats (8
// doubles) under AVX-512, 8 floats (4 doubles) under AVX2, or falls back to plain loops when the
// build targets no vector extension (minift/_build.py's cpu_flags picks the widest the building
// CPU has). Each helper walks one row of n contiguous values: full vectors first, then a scalar
// tail; none assumes a width.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace minift {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// max_i x_i (-inf for n = 0)
template <typename T>
inline T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  if (n >= Vec<T>::size()) {
    Vec<T> vm = Vec<T>::loadu(x);
    for (i = Vec<T>::size(); i + Vec<T>::size() <= n; i += Vec<T>::size())
      vm = at::vec::maximum(vm, Vec<T>::loadu(x + i));
    m = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// sum_i x_i
template <typename T>
inline T row_sum(const T* x, int64_t n) {
  Vec<T> acc(T(0));
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size()) acc += Vec<T>::loadu(x + i);
  T s = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
  for (; i < n; ++i) s += x[i];
  return s;
}

// y_i = exp(x_i - shift), returning sum_i y_i; y may be x.
template <typename T>
inline T row_exp_sum(const T* x, T* y, int64_t n, T shift) {
  const Vec<T> vs(shift);
  Vec<T> acc(T(0));
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size()) {
    Vec<T> e = (Vec<T>::loadu(x + i) - vs).exp();
    e.store(y + i);
    acc += e;
  }
  T s = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
  for (; i < n; ++i) {
    y[i] = std::exp(x[i] - shift);
    s += y[i];
  }
  return s;
}

// Neumaier's compensated running sum in double: the rounding error of each addition is carried
// apart in c and added back at the end, so the order of the terms hardly matters.
struct CompensatedSum {
  double s = 0, c = 0;
  void add(double v) {
    const double t = s + v;
    c += std::abs(s) >= std::abs(v) ? (s - t) + v : (v - t) + s;
    s = t;
  }
  double sum() const { return s + c; }
};

// s - 1, where s = sum_i exp(x_i - m) and m = max_i x_i, without writing anything. The terms with
// x_i = m are exactly 1 each: they are counted apart and all but one added back as a whole number,
// so that s - 1 keeps its digits when it is small (log s = log1p(s - 1) for a confident row). The
// exps are summed in vectors over chunks of 128 elements and the chunk sums in double: a long row
// of many equal small terms (thousands of e^-8) would otherwise drift by 1e-5 in float32.
template <typename T>
inline double row_exp_sum_minus_one(const T* x, int64_t n, T m) {
  constexpr int64_t kChunk = 128;
  const Vec<T> vm(m), zero(T(0)), one(T(1));
  auto add = [](Vec<T>& a, Vec<T>& b) { return a + b; };
  CompensatedSum total;
  Vec<T> ties(T(0));
  int64_t i = 0;
  while (i + Vec<T>::size() <= n) {
    Vec<T> acc(T(0));
    const int64_t stop = std::min(n, i + kChunk);
    for (; i + Vec<T>::size() <= stop; i += Vec<T>::size()) {
      const Vec<T> v = Vec<T>::loadu(x + i);
      const Vec<T> at_max = v == vm;                                 // all ones where x_i = m
      acc += Vec<T>::blendv((v - vm).exp(), zero, at_max);
      ties += at_max & one;
    }
    total.add((double)at::vec::vec_reduce_all<T>(add, acc));
  }
  double t = (double)at::vec::vec_reduce_all<T>(add, ties);
  for (; i < n; ++i) {
    if (x[i] == m) t += 1;
    else total.add((double)std::exp(x[i] - m));
  }
  total.add(t - 1);
  return total.sum();
}

// sum_i (m - x_i) for m >= every x_i, in double: for float32 rows each term is exact in double
// and eight double accumulators are plenty; float64 terms go through the compensated sum.
template <typename T>
inline double row_gap_sum(const T* x, int64_t n, T m) {
  if constexpr (std::is_same_v<T, double>) {
    CompensatedSum total;
    for (int64_t i = 0; i < n; ++i) total.add(m - x[i]);
    return total.sum();
  } else {
    if (n < 64) {                                                    // a short row: no vector set-up
      double total = 0;
      for (int64_t i = 0; i < n; ++i) total += (double)m - (double)x[i];
      return total;
    }
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int j = 0; j < 8; ++j) lane[j] += (double)m - (double)x[i + j];
    for (int j = 0; i < n; ++i, ++j) lane[j] += (double)m - (double)x[i];
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
}

// y_i = (exp((x_i - m) - log_s) - b) * g: a softmax row minus a constant, scaled. The max m and
// log_s = log sum_i exp(x_i - m) are subtracted one after the other, never added first: m + log_s
// would round log_s away when |m| is large (|m| = 1e8 in float32 loses it entirely).
template <typename T>
inline void row_softmax_minus(const T* x, T* y, int64_t n, T m, T log_s, T b, T g) {
  const Vec<T> vm(m), vl(log_s), vb(b), vg(g);
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size())
    ((((Vec<T>::loadu(x + i) - vm) - vl).exp() - vb) * vg).store(y + i);
  for (; i < n; ++i) y[i] = (std::exp((x[i] - m) - log_s) - b) * g;
}

// a * b + c rounded once, lane by lane. at::vec::fmadd is the FMA instruction under AVX2/AVX-512,
// but a * b + c (two roundings) in the portable build's plain-loop Vectorized; where c nearly
// cancels a * b (a_n p_c - b_c in the weighted cross-entropy's gradient) the second rounding
// doubled the error, so the portable build takes std::fma per lane instead.
template <typename T>
inline Vec<T> fma_once(const Vec<T>& a, const Vec<T>& b, const Vec<T>& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::fmadd(a, b, c);
#else
  T la[Vec<T>::size()], lb[Vec<T>::size()], lc[Vec<T>::size()];
  a.store(la);
  b.store(lb);
  c.store(lc);
  for (int64_t j = 0; j < Vec<T>::size(); ++j) la[j] = std::fma(la[j], lb[j], lc[j]);
  return Vec<T>::loadu(la);
#endif
}

// y_i = (a exp((x_i - m) - log_s) - b_i) * g: the same with a scale a of the softmax and one b_i per
// element (class weights); a p_i - b_i in one rounding (fused multiply-add), which keeps the
// weighted gradient within PyTorch's accuracy where a != 1 adds a rounding of its own.
template <typename T>
inline void row_softmax_scaled_minus(const T* x, T* y, int64_t n, T m, T log_s, T a, const T* b, T g) {
  const Vec<T> vm(m), vl(log_s), va(a), vg(g);
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size())
    (fma_once(va, ((Vec<T>::loadu(x + i) - vm) - vl).exp(), -Vec<T>::loadu(b + i)) * vg).store(y + i);
  for (; i < n; ++i) y[i] = std::fma(a, std::exp((x[i] - m) - log_s), -b[i]) * g;
}

// sum_i w_i (m - x_i), in double: float32 terms exactly, float64 ones compensated.
template <typename T>
inline double row_weighted_gap_sum(const T* x, const T* w, int64_t n, T m) {
  if constexpr (std::is_same_v<T, double>) {
    CompensatedSum total;
    for (int64_t i = 0; i < n; ++i) total.add(w[i] * (m - x[i]));
    return total.sum();
  } else {
    double lane[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
      for (int j = 0; j < 4; ++j) lane[j] += (double)w[i + j] * ((double)m - (double)x[i + j]);
    for (int j = 0; i < n; ++i, ++j) lane[j] += (double)w[i] * ((double)m - (double)x[i]);
    return (lane[0] + lane[1]) + (lane[2] + lane[3]);
  }
}

// A row of n values of type S as T: the row itself when S is T; otherwise each value converted into
// buf (n values of T; float16 and bfloat16 rows become float32 exactly). The kernels that take
// bfloat16 activations under autocast read them this way, a row at a time in cache, instead of
// widening the whole tensor in a pass of its own.
template <typename T, typename S>
inline const T* row_as(const S* src, T* buf, int64_t n) {
  if constexpr (std::is_same_v<S, T>) {
    return src;
  } else {
    int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float> && (std::is_same_v<S, c10::BFloat16> || std::is_same_v<S, c10::Half>)) {
      for (; i + Vec<S>::size() <= n; i += Vec<S>::size()) {
        auto [lo, hi] = at::vec::convert_to_float<S>(Vec<S>::loadu(src + i));
        lo.store(buf + i);
        hi.store(buf + i + Vec<float>::size());
      }
    }
#endif
    for (; i < n; ++i) buf[i] = static_cast<T>(src[i]);
    return buf;
  }
}

// dst_i = src_i rounded to D (to nearest, ties to even, as Tensor.to does); a copy when D is T.
template <typename D, typename T>
inline void store_row(const T* src, D* dst, int64_t n) {
  if constexpr (std::is_same_v<D, T>) {
    if (src != dst) std::copy(src, src + n, dst);
  } else {
    int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float> && (std::is_same_v<D, c10::BFloat16> || std::is_same_v<D, c10::Half>)) {
      for (; i + Vec<D>::size() <= n; i += Vec<D>::size())
        at::vec::convert_from_float<D>(Vec<float>::loadu(src + i), Vec<float>::loadu(src + i + Vec<float>::size()))
            .store(dst + i);
    }
#endif
    for (; i < n; ++i) dst[i] = static_cast<D>(src[i]);
  }
}

// sum_i x_i y_i
template <typename T>
inline T row_dot(const T* x, const T* y, int64_t n) {
  Vec<T> acc(T(0));
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size()) acc = at::vec::fmadd(Vec<T>::loadu(x + i), Vec<T>::loadu(y + i), acc);
  T s = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

}  // namespace minift
