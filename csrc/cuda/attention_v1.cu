// Attention, version 1 (CUDA): fused attention forward and backward, and the dropout mask
// (the cross-entropy kernels are in xent.cu).
//
// Version 1, the readable baseline. float16/bfloat16 with D = 32/64/128 on sm_80+ goes to
// version 3 (attention_v3.cu: tiles in shared memory, tensor cores), forward and backward; float32
// with D = 32/64/128 to attention_rows.cu (a few threads per row, tiles in shared memory, no
// atomics). It needs no torch header: raw pointers, sizes and a stream come in from cuda_ops.cpp,
// so `nvcc -c` compiles this file on a machine with no GPU.
//
// Attention: one warp per query row. Lanes split the head dimension D (any D; 32/64/128 use 1/2/4
// elements per lane). Keys stream past in order with the online softmax:
//   m' = max(m, s_j),  l' = l e^{m - m'} + e^{s_j - m'},  acc' = acc e^{m - m'} + e^{s_j - m'} v_j
// so neither the scores nor the probabilities of a row are ever stored. The output is acc / l and
// the row's log-sum-exp m + log l is saved for the backward, which recomputes P_ij from it.
// Dropout uses the same Philox bits as the CPU kernel (philox.h), element (row, j) -> row * Tk + j.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <initializer_list>

#include "../philox.h"
#include "common.cuh"
#include "kernels.h"

namespace minift {
namespace cuda {

constexpr int kMaxPerLane = 8;  // D up to 256 in registers; larger D loops over chunks
constexpr int kWarpsPerBlock = 4;

// ------------------------------------------------------------------------------------------
// Attention forward
// ------------------------------------------------------------------------------------------

template <typename T>
__global__ void attention_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                     const bool* __restrict__ mask, T* __restrict__ out, float* __restrict__ lse,
                                     AttnShape s, float scale, float p, uint64_t seed, uint64_t offset) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);   // (b*H + h)*Tq + i
  if (row >= (int64_t)s.B * s.H * s.Tq) return;
  const int64_t bh = row / s.Tq;
  const int b = (int)(bh / s.H);
  const T* qi = q + row * s.D;
  const T* kb = k + bh * s.Tk * s.D;
  const T* vb = v + bh * s.Tk * s.D;
  const uint32_t threshold = dropout_threshold(p);
  const float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  const int per_lane = (s.D + 31) / 32;

  float qr[kMaxPerLane], acc[kMaxPerLane];
  for (int c = 0; c < per_lane; ++c) {
    int d = lane + 32 * c;
    qr[c] = d < s.D ? to_f(qi[d]) * scale : 0.f;                      // fold the scale into q
    acc[c] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int j = 0; j < s.Tk; ++j) {
    if (mask != nullptr && !mask[(int64_t)b * s.Tk + j]) continue;
    float part = 0.f;
    for (int c = 0; c < per_lane; ++c) {
      int d = lane + 32 * c;
      if (d < s.D) part += qr[c] * to_f(kb[(int64_t)j * s.D + d]);
    }
    const float sj = warp_sum(part);                                   // s_j = scale q_i . k_j
    const float m_new = fmaxf(m, sj);
    const float correction = __expf(m - m_new);                        // e^{m - m'} (0 when m = -inf)
    float e = __expf(sj - m_new);
    l = l * correction + e;                                            // l' = l e^{m-m'} + e^{s_j-m'}
    if (p > 0.f) e = philox_bits(seed, offset, (uint64_t)row * s.Tk + j) < threshold ? 0.f : e * keep_scale;
    for (int c = 0; c < per_lane; ++c) {
      int d = lane + 32 * c;
      float vd = d < s.D ? to_f(vb[(int64_t)j * s.D + d]) : 0.f;
      acc[c] = acc[c] * correction + e * vd;                           // acc' = acc e^{m-m'} + P~ v_j
    }
    m = m_new;
  }
  const bool empty = (m == -INFINITY);
  const float inv_l = empty ? 0.f : 1.f / l;
  for (int c = 0; c < per_lane; ++c) {
    int d = lane + 32 * c;
    if (d < s.D) out[row * s.D + d] = from_f<T>(acc[c] * inv_l);       // o_i = acc / l (0 if empty)
  }
  if (lane == 0) lse[row] = empty ? -INFINITY : m + __logf(l);
}

// ------------------------------------------------------------------------------------------
// Attention backward: dQ per row in registers, dK and dV accumulated with float atomics
// ------------------------------------------------------------------------------------------

template <typename T>
__global__ void attention_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,
                                     const T* __restrict__ v, const T* __restrict__ out,
                                     const float* __restrict__ lse, const bool* __restrict__ mask,
                                     T* __restrict__ dq, float* __restrict__ dk_acc, float* __restrict__ dv_acc,
                                     AttnShape s, float scale, float p, uint64_t seed, uint64_t offset) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= (int64_t)s.B * s.H * s.Tq) return;
  const int64_t bh = row / s.Tq;
  const int b = (int)(bh / s.H);
  const T* kb = k + bh * s.Tk * s.D;
  const T* vb = v + bh * s.Tk * s.D;
  float* dkb = dk_acc + bh * s.Tk * s.D;
  float* dvb = dv_acc + bh * s.Tk * s.D;
  const uint32_t threshold = dropout_threshold(p);
  const float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  const int per_lane = (s.D + 31) / 32;
  const float lse_i = lse[row];

  float qr[kMaxPerLane], dor[kMaxPerLane], dqr[kMaxPerLane];
  float part = 0.f;
  for (int c = 0; c < per_lane; ++c) {
    int d = lane + 32 * c;
    qr[c] = d < s.D ? to_f(q[row * s.D + d]) : 0.f;
    dor[c] = d < s.D ? to_f(dout[row * s.D + d]) : 0.f;
    dqr[c] = 0.f;
    if (d < s.D) part += dor[c] * to_f(out[row * s.D + d]);
  }
  const float Di = warp_sum(part);                                     // D_i = dO_i . O_i
  if (lse_i != -INFINITY) {
    for (int j = 0; j < s.Tk; ++j) {
      if (mask != nullptr && !mask[(int64_t)b * s.Tk + j]) continue;
      float qk = 0.f, dov = 0.f;
      for (int c = 0; c < per_lane; ++c) {
        int d = lane + 32 * c;
        if (d < s.D) {
          qk += qr[c] * to_f(kb[(int64_t)j * s.D + d]);
          dov += dor[c] * to_f(vb[(int64_t)j * s.D + d]);
        }
      }
      qk = warp_sum(qk);
      dov = warp_sum(dov);                                             // dP~_ij = dO_i . v_j
      const float pij = __expf(qk * scale - lse_i);                   // P_ij, recomputed
      float mult = 1.f;
      if (p > 0.f) mult = philox_bits(seed, offset, (uint64_t)row * s.Tk + j) < threshold ? 0.f : keep_scale;
      const float ds = pij * (dov * mult - Di);                        // dS_ij = P_ij (dP_ij - D_i)
      const float pt = pij * mult;                                     // P~_ij
      for (int c = 0; c < per_lane; ++c) {
        int d = lane + 32 * c;
        if (d < s.D) {
          dqr[c] += ds * to_f(kb[(int64_t)j * s.D + d]);               // dQ_i += dS_ij k_j
          atomicAdd(dkb + (int64_t)j * s.D + d, ds * scale * qr[c]);   // dK_j += scale dS_ij q_i
          atomicAdd(dvb + (int64_t)j * s.D + d, pt * dor[c]);          // dV_j += P~_ij dO_i
        }
      }
    }
  }
  for (int c = 0; c < per_lane; ++c) {
    int d = lane + 32 * c;
    if (d < s.D) dq[row * s.D + d] = from_f<T>(dqr[c] * scale);
  }
}

__global__ void dropout_mask_kernel(bool* keep, int64_t n, float p, uint64_t seed, uint64_t offset) {
  const uint32_t threshold = dropout_threshold(p);
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    keep[i] = philox_bits(seed, offset, (uint64_t)i) >= threshold;
}

// ------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------

// Version 3 (attention_v3.cu) where the GPU, dtype and head dim allow it and every 16-bit input it
// loads 16 bytes at a time starts on a 16-byte boundary.
static bool use_tc(DType dt, int D, std::initializer_list<const void*> inputs) {
  uintptr_t bits = 0;
  for (const void* ptr : inputs) bits |= (uintptr_t)ptr;
  return (bits & 15) == 0 && attention_tc_supported(dt, D);
}

static int attn_blocks(const AttnShape& s) {
  int64_t rows = (int64_t)s.B * s.H * s.Tq;
  return (int)((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

template <typename T>
static void launch_fwd(const void* q, const void* k, const void* v, const bool* mask, void* out, float* lse,
                       AttnShape s, float scale, float p, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  attention_fwd_kernel<T><<<attn_blocks(s), 32 * kWarpsPerBlock, 0, stream>>>(
      (const T*)q, (const T*)k, (const T*)v, mask, (T*)out, lse, s, scale, p, seed, offset);
}

cudaError_t attention_fwd(DType dt, const void* q, const void* k, const void* v, const bool* mask, void* out,
                          float* lse, AttnShape s, float scale, float p, uint64_t seed, uint64_t offset,
                          cudaStream_t stream) {
  if (use_tc(dt, s.D, {q, k, v}))                                     // version 3, on tensor cores
    return attention_fwd_tc(dt, q, k, v, mask, out, lse, s, scale, p, seed, offset, stream);
  if (attention_rows_supported(dt, s.D, {q, k, v, out}))              // float32 on CUDA cores
    return attention_fwd_rows(q, k, v, mask, out, lse, s, scale, p, seed, offset, stream);
  if ((s.D + 31) / 32 > kMaxPerLane) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::F32: launch_fwd<float>(q, k, v, mask, out, lse, s, scale, p, seed, offset, stream); break;
    case DType::F16: launch_fwd<__half>(q, k, v, mask, out, lse, s, scale, p, seed, offset, stream); break;
    case DType::BF16: launch_fwd<__nv_bfloat16>(q, k, v, mask, out, lse, s, scale, p, seed, offset, stream); break;
  }
  return cudaGetLastError();
}

template <typename T>
static void launch_bwd(const void* dout, const void* q, const void* k, const void* v, const void* out,
                       const float* lse, const bool* mask, void* dq, void* dk, void* dv, float* dk_acc,
                       float* dv_acc, AttnShape s, float scale, float p, uint64_t seed, uint64_t offset,
                       cudaStream_t stream) {
  const int64_t n = (int64_t)s.B * s.H * s.Tk * s.D;
  cudaMemsetAsync(dk_acc, 0, n * sizeof(float), stream);
  cudaMemsetAsync(dv_acc, 0, n * sizeof(float), stream);
  attention_bwd_kernel<T><<<attn_blocks(s), 32 * kWarpsPerBlock, 0, stream>>>(
      (const T*)dout, (const T*)q, (const T*)k, (const T*)v, (const T*)out, lse, mask, (T*)dq, dk_acc, dv_acc, s,
      scale, p, seed, offset);
  scale_cast_kernel<T><<<grid_for(n), kGridThreads, 0, stream>>>(dk_acc, (T*)dk, n, 1.f);
  scale_cast_kernel<T><<<grid_for(n), kGridThreads, 0, stream>>>(dv_acc, (T*)dv, n, 1.f);
}


int64_t attention_bwd_scratch(DType dt, const void* dout, const void* q, const void* k, const void* v,
                              const void* out, AttnShape s) {
  if (use_tc(dt, s.D, {dout, q, k, v})) return attention_bwd_tc_scratch(s);   // Delta
  if (attention_rows_supported(dt, s.D, {dout, q, k, v, out})) return attention_bwd_rows_scratch(s);   // Delta
  return 2 * (int64_t)s.B * s.H * s.Tk * s.D;                                    // dK and dV in float
}

cudaError_t attention_bwd(DType dt, const void* dout, const void* q, const void* k, const void* v, const void* out,
                          const float* lse, const bool* mask, void* dq, void* dk, void* dv, float* scratch,
                          AttnShape s, float scale, float p, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  if (use_tc(dt, s.D, {dout, q, k, v}))                              // version 3, on tensor cores
    return attention_bwd_tc(dt, dout, q, k, v, out, lse, mask, dq, dk, dv, scratch, s, scale, p, seed, offset,
                            stream);
  if (attention_rows_supported(dt, s.D, {dout, q, k, v, out}))         // float32 on CUDA cores
    return attention_bwd_rows(dout, q, k, v, out, lse, mask, dq, dk, dv, scratch, s, scale, p, seed, offset, stream);
  if ((s.D + 31) / 32 > kMaxPerLane) return cudaErrorInvalidValue;
  float* dk_acc = scratch;
  float* dv_acc = scratch + (int64_t)s.B * s.H * s.Tk * s.D;
  switch (dt) {
    case DType::F32:
      launch_bwd<float>(dout, q, k, v, out, lse, mask, dq, dk, dv, dk_acc, dv_acc, s, scale, p, seed, offset, stream);
      break;
    case DType::F16:
      launch_bwd<__half>(dout, q, k, v, out, lse, mask, dq, dk, dv, dk_acc, dv_acc, s, scale, p, seed, offset, stream);
      break;
    case DType::BF16:
      launch_bwd<__nv_bfloat16>(dout, q, k, v, out, lse, mask, dq, dk, dv, dk_acc, dv_acc, s, scale, p, seed, offset,
                                stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t dropout_mask(bool* keep, int64_t n, float p, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  dropout_mask_kernel<<<grid_for(n), kGridThreads, 0, stream>>>(keep, n, p, seed, offset);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace minift
