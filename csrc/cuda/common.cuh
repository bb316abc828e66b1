// Device helpers shared by the CUDA kernel files: conversions between the storage types and float,
// a warp-wide sum, a grid size for grid-stride loops, and a float-to-storage cast. No torch header,
// like the kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace minift {
namespace cuda {

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

constexpr int kGridThreads = 256;

// Blocks of kGridThreads for a grid-stride loop over `work` items: at least 1, at most 65535.
inline unsigned grid_for(int64_t work) {
  const int64_t blocks = (work + kGridThreads - 1) / kGridThreads;
  return (unsigned)(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

// dst = src * scale in the storage type (the float accumulators of a backward, written out).
template <typename T>
__global__ void scale_cast_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n, float scale) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = from_f<T>(src[i] * scale);
}

}  // namespace cuda
}  // namespace minift
