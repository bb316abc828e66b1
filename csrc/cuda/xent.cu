// CUDA kernels of the fused softmax cross-entropy, version 2: one read of the logits per pass.
//
// The math is cross_entropy.cpp's. Row n, target y, label smoothing eps, C classes:
//   m = max_c z_c,  log s = log sum_c e^{z_c - m}
//   loss_n = (1 - eps)((m - z_y) + log s) + eps (log s + (m - mean_c z_c))
//   dz_c = (e^{(z_c - m) - log s} - eps/C - (1 - eps)[c = y]) * w_n
// with w_n = g_n (reduction none), g (sum) or g / #rows not ignored (mean). m and log s are kept
// apart, in the (2, N) row statistics, and never added: lse = m + log s rounds to the spacing of
// |lse| (1e-6 at 16), and e^{z - lse} would carry that error into every probability (in float32,
// 8 ulp of the gradient on N(0, 4^2) logits, 3.5x F.cross_entropy's error).
//
// Memory is the floor: the forward reads N*C logits once, the backward reads them once more and
// writes N*C gradients. Version 1 read each row three times (max, then sum_z, then the exps).
// Here each thread keeps an online (max, sum) pair, rescaling its sum when its max grows:
//   m' = max(m, x),  s' = s e^{m - m'} + e^{x - m'}
// and the threads of a row merge their pairs the same way at the end. Loads are 16 bytes wide
// (4 floats or 8 halves): a row of a (N, 30522) matrix starts at any 4-byte boundary, so each row
// walks a short scalar head up to the first 16-byte boundary, then whole vectors, then a scalar tail.
//
// Threads per row: a warp (32) when C <= 1024, eight rows to a block of 256; a whole block of 256
// for longer rows. A target outside [0, C) that is not ignore_index stops the kernel with a message
// (printf, then __trap, as PyTorch's own device-side asserts do) instead of a host check that would
// wait for the GPU on every call.
//
// For float32 logits, exp, log and the divisions are accurate_math.h's (about one ulp, and divisions
// rounded once; the fast-math intrinsics cost 3-4x PyTorch's error). For float16/bfloat16 logits the
// exps are the fast intrinsic: its few float32 ulps vanish in the gradient's 16-bit rounding.
//
// The mean and sum are one more block: it adds the row losses in a fixed order (the same result on
// every run) and counts the rows not ignored. No torch header, so `nvcc -c` compiles this file.
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "accurate_math.h"
#include "common.cuh"
#include "kernels.h"

namespace minift {
namespace cuda {

constexpr int kXentBlock = 256;
constexpr int kReduceBlock = 1024;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Sum over the TPR threads of one row: a warp shuffle, then, when a row has several warps, shared
// memory across them. Every thread gets the result. (The (max, sum) pairs merge in MaxSum below.)
template <int TPR>
__device__ __forceinline__ float group_sum(float x, float* shared) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  if constexpr (TPR > 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    x = lane < TPR / 32 ? shared[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  }
  return x;
}

// e^x: accurate_math.h's for float32 logits, the intrinsic for 16-bit ones (see the top).
template <typename T>
__device__ __forceinline__ float exp_for(float x) {
  if constexpr (sizeof(T) == 4) return exp_f32(x);
  else return __expf(x);
}

// (m, s) with s = sum e^{x - m}; merging two keeps the larger max. m = -inf means "nothing yet".
// c: a thread's running compensation while it absorbs float32 logits (Kahan: the sum is s - c),
// folded into s before the threads merge (fold). A thread adds C / TPR terms one after another (156
// at C = 40000), and plain float adds put log s 2-4 ulp off, the gradient 3x F.cross_entropy's
// error; compensated, under one ulp.
struct MaxSum {
  float m, s, c;
};

__device__ __forceinline__ MaxSum fold(MaxSum a) { return {a.m, a.s - a.c, 0.f}; }

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f, 0.f};
  return {m, a.s * exp_f32(a.m - m) + b.s * exp_f32(b.m - m), 0.f};
}

template <int TPR>
__device__ __forceinline__ MaxSum group_merge(MaxSum x, float* shared_m, float* shared_s) {
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum y{__shfl_xor_sync(0xffffffffu, x.m, o), __shfl_xor_sync(0xffffffffu, x.s, o), 0.f};
    x = merge(x, y);
  }
  if constexpr (TPR > 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
      shared_m[warp] = x.m;
      shared_s[warp] = x.s;
    }
    __syncthreads();
    x = lane < TPR / 32 ? MaxSum{shared_m[lane], shared_s[lane], 0.f} : MaxSum{-INFINITY, 0.f, 0.f};
    for (int o = 16; o > 0; o >>= 1) {
      MaxSum y{__shfl_xor_sync(0xffffffffu, x.m, o), __shfl_xor_sync(0xffffffffu, x.s, o), 0.f};
      x = merge(x, y);
    }
  }
  return x;
}

// Elements before the first 16-byte boundary of row (at most VEC - 1 of them, at most C).
template <typename T, int VEC>
__device__ __forceinline__ int64_t head_of(const T* row, int64_t C) {
  if (VEC == 1) return 0;
  const int64_t h = (int64_t)((16 - ((uintptr_t)row & 15)) & 15) / (int64_t)sizeof(T);
  return h < C ? h : C;
}

// Adds x[0..count) to a thread's online pair: one rescale per vector, one exp per element; the
// adds compensated for float32 logits (see MaxSum).
template <typename T, int K>
__device__ __forceinline__ void absorb(MaxSum& st, float& sum_z, const float (&x)[K], int count) {
  float vmax = -INFINITY;
#pragma unroll
  for (int j = 0; j < K; ++j)
    if (j < count) vmax = fmaxf(vmax, x[j]);
  const float m = fmaxf(st.m, vmax);
  if (m == -INFINITY) return;                                        // only -inf so far: nothing to add
  const float rescale = exp_for<T>(st.m - m);
  float s = st.s * rescale, c = st.c * rescale;
#pragma unroll
  for (int j = 0; j < K; ++j)
    if (j < count) {
      const float e = exp_for<T>(x[j] - m);
      if constexpr (sizeof(T) == 4) {
        const float y = e - c, t = s + y;
        c = (t - s) - y;
        s = t;
      } else {
        s += e;
      }
      sum_z += x[j];
    }
  st = {m, s, c};
}

// A target outside [0, C) that is not ignore_index stops the kernel, with the row in the message.
__device__ __forceinline__ void check_target(int64_t y, int64_t C, int64_t ignore_index, int64_t n, int lane) {
  if (y != ignore_index && (y < 0 || y >= C)) {
    if (lane == 0)
      printf("minift softmax_cross_entropy: expected targets in [0, %lld) or ignore_index %lld, got %lld at row %lld\n",
             (long long)C, (long long)ignore_index, (long long)y, (long long)n);
    __trap();
  }
}

// loss_n = (1 - eps)((m - z_y) + log s) + eps (log s + (m - mean_c z_c))
__device__ __forceinline__ float row_loss(float m, float log_s, float zy, float sum_z, int64_t C, float eps) {
  return (1.f - eps) * ((m - zy) + log_s) + eps * (log_s + (m - div_rn(sum_z, (float)C)));
}


template <typename T, int TPR, int VEC>
__global__ void __launch_bounds__(kXentBlock)
    xent_fwd_kernel(const T* __restrict__ z, const int64_t* __restrict__ target, float* __restrict__ rows,
                    float* __restrict__ stats, int64_t N, int64_t C, int64_t ignore_index, float eps) {
  __shared__ float shared_m[32], shared_s[32];
  const int lane = threadIdx.x % TPR;
  const int64_t n = (int64_t)blockIdx.x * (kXentBlock / TPR) + threadIdx.x / TPR;
  if (n >= N) return;                                                // a whole row group leaves together
  const int64_t y = target[n];
  check_target(y, C, ignore_index, n, lane);
  const T* row = z + n * C;
  MaxSum st{-INFINITY, 0.f, 0.f};
  float sum_z = 0.f;
  const int64_t head = head_of<T, VEC>(row, C);
  const int64_t nvec = (C - head) / VEC;
  for (int64_t c = lane; c < head; c += TPR) absorb<T, 1>(st, sum_z, {to_f(row[c])}, 1);
  const Pack<T, VEC>* body = reinterpret_cast<const Pack<T, VEC>*>(row + head);
  for (int64_t i = lane; i < nvec; i += TPR) {
    const Pack<T, VEC> p = body[i];
    float x[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) x[j] = to_f(p.v[j]);
    absorb<T, VEC>(st, sum_z, x, VEC);
  }
  for (int64_t c = head + nvec * VEC + lane; c < C; c += TPR) absorb<T, 1>(st, sum_z, {to_f(row[c])}, 1);
  st = group_merge<TPR>(fold(st), shared_m, shared_s);
  if (eps > 0.f) sum_z = group_sum<TPR>(sum_z, shared_m);
  if (lane == 0) {
    const float log_s = log_f32(st.s);                                  // log sum e^{z - m}
    stats[n] = st.m;
    stats[N + n] = log_s;
    rows[n] = y == ignore_index ? 0.f : row_loss(st.m, log_s, to_f(row[y]), sum_z, C, eps);
  }
}

// One element of the gradient: (p - q) w with p = e^{(x - m) - log s}.
template <typename T>
__device__ __forceinline__ float grad_of(float x, int64_t c, int64_t y, float m, float log_s, float smooth, float hit,
                                         float w) {
  return (exp_for<T>((x - m) - log_s) - smooth - (c == y ? hit : 0.f)) * w;
}

template <typename T, int TPR, int VEC>
__global__ void __launch_bounds__(kXentBlock)
    xent_bwd_kernel(const float* __restrict__ w, int64_t w_stride, const T* __restrict__ z,
                    const int64_t* __restrict__ target, const float* __restrict__ stats, T* __restrict__ dz, int64_t N,
                    int64_t C, int64_t ignore_index, float eps, const float* __restrict__ skip_if_one) {
  if (skip_if_one != nullptr && *skip_if_one == 1.f) return;        // dz already holds this gradient
  const int lane = threadIdx.x % TPR;
  const int64_t n = (int64_t)blockIdx.x * (kXentBlock / TPR) + threadIdx.x / TPR;
  if (n >= N) return;
  const int64_t y = target[n];
  const bool ignored = y == ignore_index;
  const float g = ignored ? 0.f : w[n * w_stride], m = stats[n], log_s = stats[N + n];
  const float smooth = div_rn(eps, (float)C), hit = 1.f - eps;
  const T* row = z + n * C;
  T* drow = dz + n * C;
  const int64_t head = head_of<T, VEC>(row, C);                       // dz rows share z's alignment
  const int64_t nvec = (C - head) / VEC;
  for (int64_t c = lane; c < head; c += TPR)
    drow[c] = from_f<T>(ignored ? 0.f : grad_of<T>(to_f(row[c]), c, y, m, log_s, smooth, hit, g));
  const Pack<T, VEC>* body = reinterpret_cast<const Pack<T, VEC>*>(row + head);
  Pack<T, VEC>* dbody = reinterpret_cast<Pack<T, VEC>*>(drow + head);
  for (int64_t i = lane; i < nvec; i += TPR) {
    const Pack<T, VEC> p = body[i];
    Pack<T, VEC> d;
    const int64_t c0 = head + i * VEC;
#pragma unroll
    for (int j = 0; j < VEC; ++j) d.v[j] = from_f<T>(ignored ? 0.f : grad_of<T>(to_f(p.v[j]), c0 + j, y, m, log_s, smooth, hit, g));
    dbody[i] = d;
  }
  for (int64_t c = head + nvec * VEC + lane; c < C; c += TPR)
    drow[c] = from_f<T>(ignored ? 0.f : grad_of<T>(to_f(row[c]), c, y, m, log_s, smooth, hit, g));
}

// Version 3, the one-pass forward (loss and gradient together), for reduction mean when the logits
// need a gradient (the op also takes sum; autograd.cpp says why it asks for the mean only), for rows
// of up to 1024 classes: a warp reads its row once, into registers (MAXP 16-byte packs per thread),
// merges the (max, sum) pairs of its lanes, and writes the gradient from the same registers with
// the weight w0 = 1 (sum) or 1 / #rows not ignored (mean, from the count kernel before). That is one
// read of the logits and one write of the gradient in all, against a read in the forward and a read
// and a write in the backward: the backward then has nothing to do when the incoming gradient is
// exactly 1 (loss.backward()), and recomputes dz from the logits otherwise.
// Longer rows take the two passes. A whole row held in registers until its sum is known leaves room
// for one or two such rows per SM: on an H100, one pass with a block of 256 or 512 threads per row
// lost to the two passes in 16 of 21 cases between C = 1025 and 30522 (0.66-0.97x; it tied once and
// won four, in float16 from 8192 up), while a warp per row won every case up to 1024 (1.3-2.2x).
template <typename T, int VEC, int MAXP>
__global__ void __launch_bounds__(kXentBlock)
    xent_fwd_grad_kernel(const T* __restrict__ z, const int64_t* __restrict__ target, float* __restrict__ rows,
                         float* __restrict__ stats, T* __restrict__ dz, const float* __restrict__ w0, int64_t N,
                         int64_t C, int64_t ignore_index, float eps) {
  constexpr int TPR = 32;
  const int lane = threadIdx.x % TPR;
  const int64_t n = (int64_t)blockIdx.x * (kXentBlock / TPR) + threadIdx.x / TPR;
  if (n >= N) return;                                                // whole rows leave together
  const int64_t y = target[n];
  check_target(y, C, ignore_index, n, lane);
  const T* row = z + n * C;
  T* drow = dz + n * C;
  const int64_t head = head_of<T, VEC>(row, C);                       // dz rows share z's alignment
  const int64_t nvec = (C - head) / VEC;
  const int64_t tail0 = head + nvec * VEC;
  // this thread's numbers: packs lane, lane + TPR, ...; one scalar of the head and one of the tail
  Pack<T, VEC> packs[MAXP];
  const Pack<T, VEC>* body = reinterpret_cast<const Pack<T, VEC>*>(row + head);
#pragma unroll
  for (int k = 0; k < MAXP; ++k)
    if (lane + (int64_t)k * TPR < nvec) packs[k] = body[lane + (int64_t)k * TPR];   // all loads in flight first
  const float xh = lane < head ? to_f(row[lane]) : 0.f;
  const float xt = tail0 + lane < C ? to_f(row[tail0 + lane]) : 0.f;
  MaxSum st{-INFINITY, 0.f, 0.f};
  float sum_z = 0.f;
  if (lane < head) absorb<T, 1>(st, sum_z, {xh}, 1);
#pragma unroll
  for (int k = 0; k < MAXP; ++k)
    if (lane + (int64_t)k * TPR < nvec) {
      float x[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) x[j] = to_f(packs[k].v[j]);
      absorb<T, VEC>(st, sum_z, x, VEC);
    }
  if (tail0 + lane < C) absorb<T, 1>(st, sum_z, {xt}, 1);
  st = group_merge<TPR>(fold(st), nullptr, nullptr);
  if (eps > 0.f) sum_z = group_sum<TPR>(sum_z, nullptr);
  const float m = st.m, log_s = log_f32(st.s);                         // log sum e^{z - m}
  const bool ignored = y == ignore_index;
  if (lane == 0) {
    stats[n] = m;
    stats[N + n] = log_s;
    rows[n] = ignored ? 0.f : row_loss(m, log_s, to_f(row[y]), sum_z, C, eps);
  }
  const float g = ignored ? 0.f : w0[0], smooth = div_rn(eps, (float)C), hit = 1.f - eps;
  if (lane < head) drow[lane] = from_f<T>(ignored ? 0.f : grad_of<T>(xh, lane, y, m, log_s, smooth, hit, g));
  Pack<T, VEC>* dbody = reinterpret_cast<Pack<T, VEC>*>(drow + head);
#pragma unroll
  for (int k = 0; k < MAXP; ++k) {
    const int64_t i = lane + (int64_t)k * TPR;
    if (i < nvec) {
      Pack<T, VEC> d;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        d.v[j] = from_f<T>(ignored ? 0.f : grad_of<T>(to_f(packs[k].v[j]), head + i * VEC + j, y, m, log_s, smooth, hit, g));
      dbody[i] = d;
    }
  }
  if (tail0 + lane < C)
    drow[tail0 + lane] = from_f<T>(ignored ? 0.f : grad_of<T>(xt, tail0 + lane, y, m, log_s, smooth, hit, g));
}

// One block: the sum of the row losses in a fixed order and the number of rows not ignored.
// out[0] = sum, or sum / max(count, 1) for the mean. With rows == nullptr it computes the mean's
// backward weight instead: out[0] = grad[0] / max(count, 1); with grad null too, the one-pass
// forward's weight: 1 / max(count, 1) for the mean, 1 for the sum.
__global__ void __launch_bounds__(kReduceBlock)
    xent_reduce_kernel(const float* __restrict__ rows, const float* __restrict__ grad,
                       const int64_t* __restrict__ target, int64_t N, int64_t ignore_index, int reduction,
                       float* __restrict__ out) {
  __shared__ float shared_sum[32];
  __shared__ long long shared_count[32];
  float sum = 0.f;
  long long count = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    if (rows != nullptr) sum += rows[i];
    count += target[i] != ignore_index;
  }
  for (int o = 16; o > 0; o >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, o);
    count += __shfl_xor_sync(0xffffffffu, count, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    shared_sum[warp] = sum;
    shared_count[warp] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sum = 0.f;
    count = 0;
    for (int k = 0; k < (int)(blockDim.x / 32); ++k) {                // warps in order: a fixed order of adds
      sum += shared_sum[k];
      count += shared_count[k];
    }
    const float kept = count > 0 ? (float)count : 1.f;
    if (rows == nullptr && grad == nullptr) out[0] = reduction == kReduceMean ? div_rn(1.f, kept) : 1.f;
    else if (rows == nullptr) out[0] = div_rn(grad[0], kept);
    else out[0] = reduction == kReduceMean ? div_rn(sum, kept) : sum;
  }
}

template <typename T, int TPR, int VEC>
static void launch_fwd(const void* z, const int64_t* target, float* rows, float* stats, int64_t N, int64_t C,
                       int64_t ignore_index, float eps, cudaStream_t stream) {
  const int64_t blocks = (N + kXentBlock / TPR - 1) / (kXentBlock / TPR);
  xent_fwd_kernel<T, TPR, VEC><<<(unsigned)blocks, kXentBlock, 0, stream>>>((const T*)z, target, rows, stats, N, C,
                                                                           ignore_index, eps);
}

template <typename T, int TPR, int VEC>
static void launch_bwd(const float* w, int64_t w_stride, const void* z, const int64_t* target, const float* stats,
                       void* dz, int64_t N, int64_t C, int64_t ignore_index, float eps, const float* skip,
                       cudaStream_t stream) {
  const int64_t blocks = (N + kXentBlock / TPR - 1) / (kXentBlock / TPR);
  xent_bwd_kernel<T, TPR, VEC><<<(unsigned)blocks, kXentBlock, 0, stream>>>(w, w_stride, (const T*)z, target, stats,
                                                                           (T*)dz, N, C, ignore_index, eps, skip);
}

// The row width picks the threads per row; 16-byte vectors whenever the pointers allow them.
template <typename T>
static void dispatch_fwd(const void* z, const int64_t* target, float* rows, float* stats, int64_t N, int64_t C,
                         int64_t ignore_index, float eps, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (C <= 1024) launch_fwd<T, 32, V>(z, target, rows, stats, N, C, ignore_index, eps, stream);
  else launch_fwd<T, kXentBlock, V>(z, target, rows, stats, N, C, ignore_index, eps, stream);
}

template <typename T>
static void dispatch_bwd(const float* w, int64_t w_stride, const void* z, const int64_t* target, const float* stats,
                         void* dz, int64_t N, int64_t C, int64_t ignore_index, float eps, const float* skip,
                         cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool same_alignment = ((uintptr_t)z & 15) == ((uintptr_t)dz & 15);
  if (C <= 1024) {
    if (same_alignment) launch_bwd<T, 32, V>(w, w_stride, z, target, stats, dz, N, C, ignore_index, eps, skip, stream);
    else launch_bwd<T, 32, 1>(w, w_stride, z, target, stats, dz, N, C, ignore_index, eps, skip, stream);
  } else {
    if (same_alignment)
      launch_bwd<T, kXentBlock, V>(w, w_stride, z, target, stats, dz, N, C, ignore_index, eps, skip, stream);
    else launch_bwd<T, kXentBlock, 1>(w, w_stride, z, target, stats, dz, N, C, ignore_index, eps, skip, stream);
  }
}

cudaError_t xent_fwd(DType dt, const void* z, const int64_t* target, float* rows, float* stats, float* loss, int64_t N,
                     int64_t C, int64_t ignore_index, float eps, int reduction, cudaStream_t stream) {
  switch (dt) {
    case DType::F32: dispatch_fwd<float>(z, target, rows, stats, N, C, ignore_index, eps, stream); break;
    case DType::F16: dispatch_fwd<__half>(z, target, rows, stats, N, C, ignore_index, eps, stream); break;
    case DType::BF16: dispatch_fwd<__nv_bfloat16>(z, target, rows, stats, N, C, ignore_index, eps, stream); break;
  }
  if (reduction != kReduceNone)
    xent_reduce_kernel<<<1, kReduceBlock, 0, stream>>>(rows, nullptr, target, N, ignore_index, reduction, loss);
  return cudaGetLastError();
}

// The one-pass forward takes rows of up to 1024 classes (a warp per row, 8 packs of 16 bytes per
// lane: 1024 float32 or 2048 16-bit values, the head and tail scalars beside), with z and dz aligned
// alike; otherwise the two-pass kernels run.
bool xent_fwd_grad_supported(const void* z, const void* dz, int64_t C) {
  return C <= kXentOnePassMaxClasses && ((uintptr_t)z & 15) == ((uintptr_t)dz & 15);
}

template <typename T>
static void launch_fwd_grad(const void* z, const int64_t* target, float* rows, float* stats, void* dz, const float* w0,
                            int64_t N, int64_t C, int64_t ignore_index, float eps, cudaStream_t stream) {
  const int64_t blocks = (N + kXentBlock / 32 - 1) / (kXentBlock / 32);
  xent_fwd_grad_kernel<T, 16 / sizeof(T), 8><<<(unsigned)blocks, kXentBlock, 0, stream>>>(
      (const T*)z, target, rows, stats, (T*)dz, w0, N, C, ignore_index, eps);
}

cudaError_t xent_fwd_grad(DType dt, const void* z, const int64_t* target, float* rows, float* stats, float* loss,
                          void* dz, float* w0, int64_t N, int64_t C, int64_t ignore_index, float eps, int reduction,
                          cudaStream_t stream) {
  if (!xent_fwd_grad_supported(z, dz, C) || reduction == kReduceNone) return cudaErrorInvalidValue;
  // w0: 1 / #rows not ignored for the mean, 1 for the sum
  xent_reduce_kernel<<<1, kReduceBlock, 0, stream>>>(nullptr, nullptr, target, N, ignore_index, reduction, w0);
  switch (dt) {
    case DType::F32: launch_fwd_grad<float>(z, target, rows, stats, dz, w0, N, C, ignore_index, eps, stream); break;
    case DType::F16: launch_fwd_grad<__half>(z, target, rows, stats, dz, w0, N, C, ignore_index, eps, stream); break;
    case DType::BF16:
      launch_fwd_grad<__nv_bfloat16>(z, target, rows, stats, dz, w0, N, C, ignore_index, eps, stream);
      break;
  }
  xent_reduce_kernel<<<1, kReduceBlock, 0, stream>>>(rows, nullptr, target, N, ignore_index, reduction, loss);
  return cudaGetLastError();
}

cudaError_t xent_bwd(DType dt, const float* grad, const void* z, const int64_t* target, const float* stats, void* dz,
                     float* weight, int64_t N, int64_t C, int64_t ignore_index, float eps, int reduction,
                     bool keep_if_one, cudaStream_t stream) {
  const float* skip = keep_if_one ? grad : nullptr;              // one-pass forward: dz is right when g = 1
  const float* w = grad;
  int64_t w_stride = reduction == kReduceNone ? 1 : 0;           // none: g_n per row; sum: g for all
  if (reduction == kReduceMean) {                                 // mean: g / count, counted on the GPU
    xent_reduce_kernel<<<1, kReduceBlock, 0, stream>>>(nullptr, grad, target, N, ignore_index, reduction, weight);
    w = weight;
  }
  switch (dt) {
    case DType::F32: dispatch_bwd<float>(w, w_stride, z, target, stats, dz, N, C, ignore_index, eps, skip, stream); break;
    case DType::F16: dispatch_bwd<__half>(w, w_stride, z, target, stats, dz, N, C, ignore_index, eps, skip, stream); break;
    case DType::BF16:
      dispatch_bwd<__nv_bfloat16>(w, w_stride, z, target, stats, dz, N, C, ignore_index, eps, skip, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace minift
