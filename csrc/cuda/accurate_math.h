// e^x and log x in float32 to about one ulp, also where the file is compiled with --use_fast_math
// (which turns expf and logf into __expf and __logf: ex2.approx and lg2.approx, about 2 ulp each,
// and an argument rounding in x log2(e) that grows with |x|). The cross-entropy kernels (xent.cu)
// use these: with the intrinsics, their float32 gradient was 3-4x PyTorch's error against float64
// on an H100 (2026-11-24), where minift promises at most 2x.
//
// Host and device: the same lines compile with g++, and tests/test_build_modes.py measures their
// error against double precision on the CPU.
#pragma once
#include <math.h>
#include <string.h>

#if defined(__CUDACC__)
#define MINIFT_MATH __host__ __device__ __forceinline__
#else
#define MINIFT_MATH inline
#endif

namespace minift {

// a / b rounded once (fast math makes / an approximate division on the GPU)
MINIFT_MATH float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// 2^n for n in [-126, 127], built from its bits (the same lines on the host and the GPU).
MINIFT_MATH float pow2i(int n) {
  const unsigned int bits = (unsigned int)(n + 127) << 23;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// ln 2 in two parts: kLn2Hi has 16 significant bits, so n * kLn2Hi is exact for |n| < 256.
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.4286068203094172e-06f;

// e^x = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 (|r| <= ln 2 / 2, computed exactly enough
// by the two-part ln 2); e^r by its Taylor series to r^7 (truncation below 6e-9, relative).
MINIFT_MATH float exp_f32(float x) {
  if (x < -87.33f) return 0.f;                      // below the smallest normal float (the GPU flushes
                                                    // subnormals to zero anyway), -inf included
  if (!(x <= 88.72f)) return x + INFINITY;          // overflow gives inf; NaN stays NaN
  const float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(n, -kLn2Hi, x);
  r = fmaf(n, -kLn2Lo, r);
  float p = 1.f / 5040.f;
  p = fmaf(p, r, 1.f / 720.f);
  p = fmaf(p, r, 1.f / 120.f);
  p = fmaf(p, r, 1.f / 24.f);
  p = fmaf(p, r, 1.f / 6.f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.f);
  p = fmaf(p, r, 1.f);
  const int ni = (int)n;                            // in [-126, 128]; 2^128 is not a float, so
  return ni > 127 ? (p * 2.f) * pow2i(ni - 1) : p * pow2i(ni);   // the top binade goes in two steps
}

// log x = e ln 2 + log f with x = f 2^e, f in [sqrt(1/2), sqrt(2)); log f = 2 atanh(u),
// u = (f - 1) / (f + 1) (|u| <= 0.172; f - 1 is exact), by the series 2u (1 + u^2/3 + ... + u^10/11).
MINIFT_MATH float log_f32(float x) {
  if (!(x > 0.f) || x == INFINITY) return x == 0.f ? -INFINITY : (x == INFINITY ? x : NAN);
  int e;
  float f = frexpf(x, &e);                          // x = f 2^e, f in [1/2, 1)
  if (f < 0.70710678118654752f) {
    f *= 2.f;
    e -= 1;
  }
  const float u = div_rn(f - 1.f, f + 1.f);
  const float u2 = u * u;
  float p = 1.f / 11.f;
  p = fmaf(p, u2, 1.f / 9.f);
  p = fmaf(p, u2, 1.f / 7.f);
  p = fmaf(p, u2, 1.f / 5.f);
  p = fmaf(p, u2, 1.f / 3.f);
  const float two_u = 2.f * u;
  const float log_f = fmaf(two_u * u2, p, two_u);
  const float fe = (float)e;
  return fmaf(fe, kLn2Hi, fmaf(fe, kLn2Lo, log_f));
}

}  // namespace minift
