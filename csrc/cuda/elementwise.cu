// CUDA kernels that touch each element once: inverted dropout with Philox bits, and AdamW's update.
// The CPU versions are in ../elementwise.cpp (dropout_fwd, adamw_step_); the math and the
// random stream are the same, so a seed gives the same dropout mask on either device.
// No torch header, so `nvcc -c` compiles this file on a machine without a GPU.
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "../philox.h"
#include "common.cuh"
#include "kernels.h"

namespace minift {
namespace cuda {

// One thread per Philox block: elements 4b .. 4b+3 take the four words of block b, as on the CPU.
template <typename T>
__global__ void dropout_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, bool* __restrict__ keep, int64_t n,
                                   uint32_t threshold, float scale, uint64_t seed, uint64_t offset) {
  const int64_t nblocks = (n + 3) / 4;
  for (int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; b < nblocks; b += (int64_t)gridDim.x * blockDim.x) {
    const Philox4 r = philox_block(seed, offset, (uint64_t)b);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * b + j;
      if (i < n) {
        const bool k = r.x[j] >= threshold;                          // keep <=> bits >= p 2^32
        keep[i] = k;
        y[i] = from_f<T>(k ? to_f(x[i]) * scale : 0.f);
      }
    }
  }
}

cudaError_t dropout_fwd(DType dt, const void* x, void* y, bool* keep, int64_t n, float p, uint64_t seed,
                        uint64_t offset, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const uint32_t threshold = dropout_threshold(p);
  const float scale = 1.f / (1.f - p);
  const unsigned grid = grid_for((n + 3) / 4);
  switch (dt) {
    case DType::F32:
      dropout_fwd_kernel<float><<<grid, kGridThreads, 0, stream>>>((const float*)x, (float*)y, keep, n, threshold, scale,
                                                                seed, offset);
      break;
    case DType::F16:
      dropout_fwd_kernel<__half><<<grid, kGridThreads, 0, stream>>>((const __half*)x, (__half*)y, keep, n, threshold,
                                                                 scale, seed, offset);
      break;
    case DType::BF16:
      dropout_fwd_kernel<__nv_bfloat16><<<grid, kGridThreads, 0, stream>>>(
          (const __nv_bfloat16*)x, (__nv_bfloat16*)y, keep, n, threshold, scale, seed, offset);
      break;
  }
  return cudaGetLastError();
}

// AdamW on float32, in ../elementwise.cpp's order of operations:
//   m = m + (g - m)(1 - b1),  v = v b2 + (1 - b2) g^2
//   theta = theta (1 - lr wd) + step_size m / (sqrt(v / (1 - b2^t)) + eps),  step_size = -lr / (1 - b1^t)
// The square root and the division are the correctly rounded ones (__fsqrt_rn, __fdiv_rn) even
// under --use_fast_math, whose approximate versions would drift from the reference step by step.
__global__ void adamw_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                             float* __restrict__ v, int64_t n, float b1c, float b2, float b2c, float inv_bc2, float eps,
                             float decay, float step_size) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float gi = g[i];
    float mi = m[i], vi = v[i], pi = p[i];
    mi = mi + (gi - mi) * b1c;
    vi = vi * b2 + b2c * gi * gi;
    const float denom = __fsqrt_rn(vi * inv_bc2) + eps;
    pi = pi * decay;
    pi = pi + __fdiv_rn(step_size * mi, denom);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
  }
}

cudaError_t adamw_step(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1, double beta2,
                       double eps, double weight_decay, int64_t step, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  // the scalars in double, rounded once, as the CPU kernel and the Python loop form them
  const float b1c = (float)(1.0 - beta1), b2 = (float)beta2, b2c = (float)(1.0 - beta2);
  const float inv_bc2 = 1.f / (float)(1.0 - pow(beta2, (double)step));
  const float step_size = (float)(-lr * (1.0 / (1.0 - pow(beta1, (double)step))));
  const float decay = (float)(1.0 - lr * weight_decay);
  adamw_kernel<<<grid_for(n), kGridThreads, 0, stream>>>(p, g, m, v, n, b1c, b2, b2c, inv_bc2, (float)eps, decay,
                                                     step_size);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace minift
