// Row helpers for the CPU kernels, in SIMD registers: at::vec::Vectorized<T> holds 8 floats (4
// doubles) under AVX2, or falls back to plain loops when the build targets no vector extension
// (setup.py adds -mavx2 -mfma only when the building CPU has them). Each helper walks one row of
// n contiguous values: full vectors first, then a scalar tail.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

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

// sum_i exp(x_i - shift), without writing anything
template <typename T>
inline T row_exp_sum_only(const T* x, int64_t n, T shift) {
  const Vec<T> vs(shift);
  Vec<T> acc(T(0));
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size()) acc += (Vec<T>::loadu(x + i) - vs).exp();
  T s = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
  for (; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

// y_i = (exp(x_i - lse) - b) * g: a softmax row minus a constant, scaled
template <typename T>
inline void row_softmax_minus(const T* x, T* y, int64_t n, T lse, T b, T g) {
  const Vec<T> vl(lse), vb(b), vg(g);
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size())
    (((Vec<T>::loadu(x + i) - vl).exp() - vb) * vg).store(y + i);
  for (; i < n; ++i) y[i] = (std::exp(x[i] - lse) - b) * g;
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
