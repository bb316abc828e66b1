// Attention, float32 on CUDA cores: the version float32 inputs with D = 32, 64 or 128 take
// (float16/bfloat16 take version 2, on tensor cores; anything else version 1, attention_v1.cu).
//
// Why not version 1: there a warp serves one query row and sums a dot product across its 32 lanes
// for every key (five shuffles per key), and the backward adds dK and dV with float atomics. On an
// H100 that ran at 1.4-2.6 TFLOP/s, 4-20x slower than PyTorch's own float32 attention.
//
// Here a row belongs to a few threads: SPLIT = D / 32 threads, each holding 32 of the row's D
// numbers in registers (in float4 chunks, interleaved: thread `sub` holds chunks sub, sub + SPLIT,
// ...), so a dot product is 32 fused multiply-adds per thread and log2(SPLIT) shuffles. A block
// serves 64 rows; the rows it streams past (keys in the forward and the dQ pass, queries in the dK/dV
// pass) come through shared memory in tiles of 4096 / D rows, which every row of the block reads
// (a broadcast: the threads of one `sub` read the same address, the SPLIT subs neighbouring ones).
// Nothing is accumulated with atomics: the backward is two passes, one per query row (dQ, and
// D_i = dO_i . O_i) and one per key row (dK, dV), each recomputing P from the saved log-sum-exp.
//
//   forward, per row i, keys in chunks of 8:  m' = max(m, max_j s_ij),  l' = l e^{m-m'} + sum_j e^{s_ij-m'},
//                                             acc' = acc e^{m-m'} + sum_j P~_ij v_j,   o_i = acc / l
//   dQ pass, per query row i:   dQ_i = scale sum_j dS_ij k_j,      dS_ij = P_ij (dP~_ij m_ij - D_i)
//   dK/dV pass, per key row j:  dK_j = scale sum_i dS_ij q_i,      dV_j = sum_i P~_ij dO_i
// with P_ij = exp(scale q_i.k_j - lse_i), m_ij the dropout multiplier (0 or 1/(1-p), Philox bits of
// element (row, j) as on the CPU: philox.h) and P~ = P m. No torch header: `nvcc -c` compiles it.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../philox.h"
#include "common.cuh"
#include "kernels.h"

namespace minift {
namespace cuda {

namespace {

constexpr int kRows = 64;         // rows (queries, or keys in the dK/dV pass) per block
constexpr int kChunk = 8;         // keys scored together in the forward before one rescale
constexpr int kOwn = 8;           // float4 chunks per thread: 32 of a row's numbers

// Sum over the SPLIT neighbouring lanes that hold one row.
template <int SPLIT>
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int o = 1; o < SPLIT; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
__device__ __forceinline__ void fma4(float4& acc, float s, float4 x) {
  acc.x += s * x.x; acc.y += s * x.y; acc.z += s * x.z; acc.w += s * x.w;
}
__device__ __forceinline__ float4 scale4(float4 a, float s) { return make_float4(a.x * s, a.y * s, a.z * s, a.w * s); }

// This thread's part of row `r` of a (rows, D) float4 array: chunk c is float4 number sub + SPLIT c.
template <int SPLIT>
__device__ __forceinline__ void load_part(float4 (&dst)[kOwn], const float4* rowp, int sub, bool valid) {
#pragma unroll
  for (int c = 0; c < kOwn; ++c) dst[c] = valid ? rowp[sub + SPLIT * c] : make_float4(0.f, 0.f, 0.f, 0.f);
}

template <int SPLIT>
__device__ __forceinline__ float dot_part(const float4 (&a)[kOwn], const float4* rowp, int sub) {
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kOwn; ++c) s += dot4(a[c], rowp[sub + SPLIT * c]);
  return s;
}

// Copies rows [r0, r0 + n) of a contiguous (rows, D) float array into shared memory, float4 at a time.
__device__ __forceinline__ void load_tile(float4* dst, const float4* src, int n, int D) {
  for (int x = threadIdx.x; x < n * D / 4; x += blockDim.x) dst[x] = src[x];
}

// The keys [j0, j0 + n) of one (batch, head) into shared memory: their K and V rows, and whether the
// padding mask keeps each (the forward and the dQ pass stream the keys the same way).
__device__ __forceinline__ void load_key_tile(float4* Ks, float4* Vs, bool* keep_key, const float4* kb,
                                              const float4* vb, const bool* mask, int b, int Tk, int j0, int n,
                                              int D) {
  load_tile(Ks, kb + (int64_t)j0 * (D / 4), n, D);
  load_tile(Vs, vb + (int64_t)j0 * (D / 4), n, D);
  for (int x = threadIdx.x; x < n; x += blockDim.x) keep_key[x] = mask == nullptr || mask[(int64_t)b * Tk + j0 + x];
}

template <int D>
__global__ void __launch_bounds__(kRows * D / 32)
attention_fwd_rows_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                          const bool* __restrict__ mask, float* __restrict__ out, float* __restrict__ lse,
                          AttnShape s, float scale, float p, uint64_t seed, uint64_t offset) {
  constexpr int SPLIT = D / 32, BK = 4096 / D, V4 = D / 4;
  __shared__ float4 Ks[BK * V4], Vs[BK * V4];
  __shared__ bool keep_key[BK];
  const int sub = threadIdx.x % SPLIT;
  const int i = blockIdx.y * kRows + threadIdx.x / SPLIT;         // (B H) on x: up to 2^31 - 1 of them
  const int64_t bh = blockIdx.x;
  const int b = (int)(bh / s.H);
  const bool active = i < s.Tq;              // inactive threads still load tiles and join the shuffles
  const int64_t row = bh * s.Tq + i;
  const uint32_t threshold = dropout_threshold(p);
  const float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;

  float4 qr[kOwn], acc[kOwn];
  load_part<SPLIT>(qr, reinterpret_cast<const float4*>(q) + row * V4, sub, active);
#pragma unroll
  for (int c = 0; c < kOwn; ++c) {
    qr[c] = scale4(qr[c], scale);                                      // fold the scale into q
    acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  float m = -INFINITY, l = 0.f;
  const float4* kb = reinterpret_cast<const float4*>(k) + bh * s.Tk * V4;
  const float4* vb = reinterpret_cast<const float4*>(v) + bh * s.Tk * V4;
  for (int j0 = 0; j0 < s.Tk; j0 += BK) {
    const int n = min(BK, s.Tk - j0);
    __syncthreads();                                                   // the last tile is read
    load_key_tile(Ks, Vs, keep_key, kb, vb, mask, b, s.Tk, j0, n, D);
    __syncthreads();
    for (int jc = 0; jc < n; jc += kChunk) {
      float sc[kChunk];
      float cmax = -INFINITY;
#pragma unroll
      for (int u = 0; u < kChunk; ++u) {
        const int j = jc + u;                                          // j < n is the same for the whole block
        const float sj = j < n ? row_sum<SPLIT>(dot_part<SPLIT>(qr, Ks + j * V4, sub)) : 0.f;
        sc[u] = (j < n && keep_key[j]) ? sj : -INFINITY;               // s_ij = scale q_i . k_j
        cmax = fmaxf(cmax, sc[u]);
      }
      const float m_new = fmaxf(m, cmax);
      const float corr = m_new == -INFINITY ? 1.f : __expf(m - m_new); // e^{m - m'} (0 when m = -inf)
      l *= corr;
#pragma unroll
      for (int c = 0; c < kOwn; ++c) acc[c] = scale4(acc[c], corr);
#pragma unroll
      for (int u = 0; u < kChunk; ++u) {
        const int j = jc + u;
        float e = sc[u] == -INFINITY ? 0.f : __expf(sc[u] - m_new);
        l += e;                                                        // l counts every key, dropped or not
        if (p > 0.f && e != 0.f)
          e = philox_bits(seed, offset, (uint64_t)row * s.Tk + j0 + j) < threshold ? 0.f : e * keep_scale;
        if (e != 0.f) {
#pragma unroll
          for (int c = 0; c < kOwn; ++c) fma4(acc[c], e, Vs[j * V4 + sub + SPLIT * c]);   // acc += P~_ij v_j
        }
      }
      m = m_new;
    }
  }
  if (!active) return;
  const bool empty = m == -INFINITY;
  const float inv_l = empty ? 0.f : 1.f / l;
  float4* o = reinterpret_cast<float4*>(out) + row * V4;
#pragma unroll
  for (int c = 0; c < kOwn; ++c) o[sub + SPLIT * c] = scale4(acc[c], inv_l);   // o_i = acc / l (0 if empty)
  if (sub == 0) lse[row] = empty ? -INFINITY : m + __logf(l);
}

// dQ pass: one query row per SPLIT threads; writes dQ and D_i = dO_i . O_i (for the dK/dV pass).
template <int D>
__global__ void __launch_bounds__(kRows * D / 32)
attention_bwd_dq_rows_kernel(const float* __restrict__ dout, const float* __restrict__ q, const float* __restrict__ k,
                             const float* __restrict__ v, const float* __restrict__ out, const float* __restrict__ lse,
                             const bool* __restrict__ mask, float* __restrict__ dq, float* __restrict__ delta,
                             AttnShape s, float scale, float p, uint64_t seed, uint64_t offset) {
  constexpr int SPLIT = D / 32, BK = 4096 / D, V4 = D / 4;
  __shared__ float4 Ks[BK * V4], Vs[BK * V4];
  __shared__ bool keep_key[BK];
  const int sub = threadIdx.x % SPLIT;
  const int i = blockIdx.y * kRows + threadIdx.x / SPLIT;         // (B H) on x: up to 2^31 - 1 of them
  const int64_t bh = blockIdx.x;
  const int b = (int)(bh / s.H);
  const bool active = i < s.Tq;
  const int64_t row = bh * s.Tq + i;
  const uint32_t threshold = dropout_threshold(p);
  const float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;

  float4 qr[kOwn], dor[kOwn], dqr[kOwn];
  load_part<SPLIT>(qr, reinterpret_cast<const float4*>(q) + row * V4, sub, active);
  load_part<SPLIT>(dor, reinterpret_cast<const float4*>(dout) + row * V4, sub, active);
  const float4* orow = reinterpret_cast<const float4*>(out) + row * V4;
  float part = 0.f;
#pragma unroll
  for (int c = 0; c < kOwn; ++c) {
    dqr[c] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (active) part += dot4(dor[c], orow[sub + SPLIT * c]);
  }
  const float Di = row_sum<SPLIT>(part);                               // D_i = dO_i . O_i
  const float lse_i = active ? lse[row] : -INFINITY;
  const float4* kb = reinterpret_cast<const float4*>(k) + bh * s.Tk * V4;
  const float4* vb = reinterpret_cast<const float4*>(v) + bh * s.Tk * V4;
  for (int j0 = 0; j0 < s.Tk; j0 += BK) {
    const int n = min(BK, s.Tk - j0);
    __syncthreads();
    load_key_tile(Ks, Vs, keep_key, kb, vb, mask, b, s.Tk, j0, n, D);
    __syncthreads();
    for (int j = 0; j < n; ++j) {
      const float qk = row_sum<SPLIT>(dot_part<SPLIT>(qr, Ks + j * V4, sub));
      const float dpv = row_sum<SPLIT>(dot_part<SPLIT>(dor, Vs + j * V4, sub));   // dP~_ij = dO_i . v_j
      if (!keep_key[j] || lse_i == -INFINITY) continue;
      const float pij = __expf(qk * scale - lse_i);                   // P_ij, recomputed
      float mult = 1.f;
      if (p > 0.f) mult = philox_bits(seed, offset, (uint64_t)row * s.Tk + j0 + j) < threshold ? 0.f : keep_scale;
      const float ds = pij * (dpv * mult - Di);                        // dS_ij = P_ij (dP_ij - D_i)
#pragma unroll
      for (int c = 0; c < kOwn; ++c) fma4(dqr[c], ds, Ks[j * V4 + sub + SPLIT * c]);   // dQ_i += dS_ij k_j
    }
  }
  if (!active) return;
  float4* dqrow = reinterpret_cast<float4*>(dq) + row * V4;
#pragma unroll
  for (int c = 0; c < kOwn; ++c) dqrow[sub + SPLIT * c] = scale4(dqr[c], scale);
  if (sub == 0) delta[row] = Di;
}

// dK/dV pass: one key row per SPLIT threads; queries stream past with their lse and D_i.
template <int D>
__global__ void __launch_bounds__(kRows * D / 32)
attention_bwd_dkv_rows_kernel(const float* __restrict__ dout, const float* __restrict__ q, const float* __restrict__ k,
                              const float* __restrict__ v, const float* __restrict__ lse,
                              const float* __restrict__ delta, const bool* __restrict__ mask, float* __restrict__ dk,
                              float* __restrict__ dv, AttnShape s, float scale, float p, uint64_t seed,
                              uint64_t offset) {
  constexpr int SPLIT = D / 32, BQ = 4096 / D, V4 = D / 4;
  __shared__ float4 Qs[BQ * V4], dOs[BQ * V4];
  __shared__ float lse_s[BQ], delta_s[BQ];
  const int sub = threadIdx.x % SPLIT;
  const int j = blockIdx.y * kRows + threadIdx.x / SPLIT;
  const int64_t bh = blockIdx.x;
  const int b = (int)(bh / s.H);
  const bool active = j < s.Tk;
  const bool kept = active && (mask == nullptr || mask[(int64_t)b * s.Tk + j]);   // a masked key gets zeros
  const int64_t krow = bh * s.Tk + j;
  const uint32_t threshold = dropout_threshold(p);
  const float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;

  float4 kr[kOwn], vr[kOwn], dkr[kOwn], dvr[kOwn];
  load_part<SPLIT>(kr, reinterpret_cast<const float4*>(k) + krow * V4, sub, active);
  load_part<SPLIT>(vr, reinterpret_cast<const float4*>(v) + krow * V4, sub, active);
#pragma unroll
  for (int c = 0; c < kOwn; ++c) dkr[c] = dvr[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  const float4* qb = reinterpret_cast<const float4*>(q) + bh * s.Tq * V4;
  const float4* db = reinterpret_cast<const float4*>(dout) + bh * s.Tq * V4;
  for (int i0 = 0; i0 < s.Tq; i0 += BQ) {
    const int n = min(BQ, s.Tq - i0);
    __syncthreads();
    load_tile(Qs, qb + (int64_t)i0 * V4, n, D);
    load_tile(dOs, db + (int64_t)i0 * V4, n, D);
    for (int x = threadIdx.x; x < n; x += blockDim.x) {
      lse_s[x] = lse[bh * s.Tq + i0 + x];
      delta_s[x] = delta[bh * s.Tq + i0 + x];
    }
    __syncthreads();
    for (int ii = 0; ii < n; ++ii) {
      const float qk = row_sum<SPLIT>(dot_part<SPLIT>(kr, Qs + ii * V4, sub));
      const float dpv = row_sum<SPLIT>(dot_part<SPLIT>(vr, dOs + ii * V4, sub));  // dP~_ij = dO_i . v_j
      const float lse_i = lse_s[ii];
      if (!kept || lse_i == -INFINITY) continue;
      const float pij = __expf(qk * scale - lse_i);
      float mult = 1.f;
      if (p > 0.f) {
        const uint64_t qrow = (uint64_t)(bh * s.Tq + i0 + ii);
        mult = philox_bits(seed, offset, qrow * s.Tk + j) < threshold ? 0.f : keep_scale;
      }
      const float ds = pij * (dpv * mult - delta_s[ii]);
      const float pt = pij * mult;                                     // P~_ij
#pragma unroll
      for (int c = 0; c < kOwn; ++c) {
        fma4(dkr[c], ds, Qs[ii * V4 + sub + SPLIT * c]);              // dK_j += dS_ij q_i
        fma4(dvr[c], pt, dOs[ii * V4 + sub + SPLIT * c]);             // dV_j += P~_ij dO_i
      }
    }
  }
  if (!active) return;
  float4* dkrow = reinterpret_cast<float4*>(dk) + krow * V4;
  float4* dvrow = reinterpret_cast<float4*>(dv) + krow * V4;
#pragma unroll
  for (int c = 0; c < kOwn; ++c) {
    dkrow[sub + SPLIT * c] = scale4(dkr[c], scale);
    dvrow[sub + SPLIT * c] = dvr[c];
  }
}

template <int D>
void launch_fwd(const void* q, const void* k, const void* v, const bool* mask, void* out, float* lse, AttnShape s,
                float scale, float p, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  const dim3 grid(s.B * s.H, (s.Tq + kRows - 1) / kRows);
  attention_fwd_rows_kernel<D><<<grid, kRows * D / 32, 0, stream>>>(
      (const float*)q, (const float*)k, (const float*)v, mask, (float*)out, lse, s, scale, p, seed, offset);
}

template <int D>
void launch_bwd(const void* dout, const void* q, const void* k, const void* v, const void* out, const float* lse,
                const bool* mask, void* dq, void* dk, void* dv, float* delta, AttnShape s, float scale, float p,
                uint64_t seed, uint64_t offset, cudaStream_t stream) {
  const dim3 grid_q(s.B * s.H, (s.Tq + kRows - 1) / kRows), grid_k(s.B * s.H, (s.Tk + kRows - 1) / kRows);
  attention_bwd_dq_rows_kernel<D><<<grid_q, kRows * D / 32, 0, stream>>>(
      (const float*)dout, (const float*)q, (const float*)k, (const float*)v, (const float*)out, lse, mask,
      (float*)dq, delta, s, scale, p, seed, offset);
  attention_bwd_dkv_rows_kernel<D><<<grid_k, kRows * D / 32, 0, stream>>>(
      (const float*)dout, (const float*)q, (const float*)k, (const float*)v, lse, delta, mask, (float*)dk,
      (float*)dv, s, scale, p, seed, offset);
}

}  // namespace

bool attention_rows_supported(DType dt, int D, std::initializer_list<const void*> pointers) {
  uintptr_t bits = 0;
  for (const void* ptr : pointers) bits |= (uintptr_t)ptr;
  return dt == DType::F32 && (D == 32 || D == 64 || D == 128) && (bits & 15) == 0;   // float4 loads and stores
}

cudaError_t attention_fwd_rows(const void* q, const void* k, const void* v, const bool* mask, void* out, float* lse,
                               AttnShape s, float scale, float p, uint64_t seed, uint64_t offset,
                               cudaStream_t stream) {
  switch (s.D) {
    case 32: launch_fwd<32>(q, k, v, mask, out, lse, s, scale, p, seed, offset, stream); break;
    case 64: launch_fwd<64>(q, k, v, mask, out, lse, s, scale, p, seed, offset, stream); break;
    case 128: launch_fwd<128>(q, k, v, mask, out, lse, s, scale, p, seed, offset, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

int64_t attention_bwd_rows_scratch(AttnShape s) { return (int64_t)s.B * s.H * s.Tq; }   // D_i per query row

cudaError_t attention_bwd_rows(const void* dout, const void* q, const void* k, const void* v, const void* out,
                               const float* lse, const bool* mask, void* dq, void* dk, void* dv, float* scratch,
                               AttnShape s, float scale, float p, uint64_t seed, uint64_t offset,
                               cudaStream_t stream) {
  switch (s.D) {
    case 32: launch_bwd<32>(dout, q, k, v, out, lse, mask, dq, dk, dv, scratch, s, scale, p, seed, offset, stream); break;
    case 64: launch_bwd<64>(dout, q, k, v, out, lse, mask, dq, dk, dv, scratch, s, scale, p, seed, offset, stream); break;
    case 128: launch_bwd<128>(dout, q, k, v, out, lse, mask, dq, dk, dv, scratch, s, scale, p, seed, offset, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace minift
