// Attention on tensor cores (version 2), forward and backward, float16/bfloat16, head dim 32, 64 or
// 128, sm_80+.
//
// Version 1 (attention_v1.cu) gives each query row a warp and walks the keys one at a time with scalar
// FMAs: no reuse of a loaded key across rows, no tensor cores. Here a block of 4 warps takes 64
// query rows (16 per warp) of one (batch, head) and walks the keys in tiles of 64 held in shared
// memory, so each key tile loaded from global memory serves 64 rows, and the products
// S = Q K^T and O += P V run as 16x16x16 tensor-core multiplies (WMMA, float accumulators).
//
// Two passes over the keys instead of one online pass. WMMA does not say which thread holds which
// element of an accumulator, so rescaling O row by row when a row's max grows (the online softmax
// of version 1) would need O to leave the tensor-core registers at every tile. Instead:
//   pass 1: S tile by tile -> each row's max m and sum l = sum_j e^{s_j - m} (online, per thread),
//           so lse = m + log l is known before any output is formed;
//   pass 2: S again -> P = e^{s - lse} (already normalised; dropout: P * keep / (1 - p)) written
//           to shared memory in 16 bits -> O += P V on tensor cores, O never rescaled.
// The price is Q K^T twice, on tensor cores, which have FLOPs to spare at these sizes.
//
// Within a warp, lane 2r + h owns row r of the warp's 16 and columns 32h .. 32h + 31 of a tile.
// Masked keys, keys past Tk, and rows past Tq contribute nothing; a row with no kept key gives
// O = 0 and lse = -inf, as on the CPU. Dropout draws the Philox bits of element (row, j) ->
// row * Tk + j, the same stream as the CPU and version 1.
// No torch header, so `nvcc -c` compiles this file on a machine without a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>

#include "../philox.h"
#include "common.cuh"
#include "kernels.h"

namespace minift {
namespace cuda {

namespace wmma = nvcuda::wmma;

constexpr int kTcRows = 64;     // query rows per block (16 per warp)
constexpr int kTcKeys = 64;     // keys per tile
constexpr int kTcWarps = 4;
static_assert(kTcRows == kTcKeys, "products_16x64 serves both: 64 columns either way");
constexpr int kPad16 = 8;       // 16-bit rows padded by 8 elements (16 bytes) against bank conflicts
constexpr int kPad32 = 4;       // float rows padded by 4

template <int D>
struct TcLayout {
  static constexpr int ld16 = D + kPad16;                            // Q, K, V rows in shared memory
  static constexpr int ldp = kTcKeys + kPad16;                       // P rows
  static constexpr int lds = (kTcKeys > D ? kTcKeys : D) + kPad32;   // S rows, and O on the way out
  static constexpr size_t q_bytes = (size_t)kTcRows * ld16 * 2;
  static constexpr size_t k_bytes = (size_t)kTcKeys * ld16 * 2;
  static constexpr size_t s_bytes = (size_t)kTcWarps * 16 * lds * 4;
  static constexpr size_t p_bytes = (size_t)kTcWarps * 16 * ldp * 2;
  static constexpr size_t total = q_bytes + 2 * k_bytes + s_bytes + p_bytes;  // every part a multiple of 128 B
};

// rows [row0, row0 + nrows) of a (rows, D) matrix into shared memory (ld), 16 bytes at a time;
// rows at or past `limit` are zero.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, int64_t row0, int nrows, int64_t limit) {
  constexpr int kVec = 8;                                            // 8 x 16 bits = 16 bytes
  constexpr int kPerRow = D / kVec;
  for (int i = threadIdx.x; i < nrows * kPerRow; i += blockDim.x) {
    const int r = i / kPerRow, c = (i % kPerRow) * kVec;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row0 + r < limit) val = *reinterpret_cast<const uint4*>(src + (row0 + r) * D + c);
    *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
  }
}

// C (16 x 64 float, ld LDS) = A B^T for one warp: A = 16 rows of sA16, B = 64 rows of sB (each a column
// of B^T), both D wide. The forward's S = Q_w K^T, the backward's S^T = K_w Q^T and dP~^T = V_w dO^T.
template <typename T, int D, int LDS>
__device__ __forceinline__ void products_16x64(const T* sA16, const T* sB, float* sC) {
  constexpr int ld = D + kPad16;
#pragma unroll
  for (int j = 0; j < kTcRows / 16; ++j) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.f);
#pragma unroll
    for (int kd = 0; kd < D / 16; ++kd) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
      wmma::load_matrix_sync(a, sA16 + kd * 16, ld);
      wmma::load_matrix_sync(b, sB + j * 16 * ld + kd * 16, ld);
      wmma::mma_sync(c, a, b, c);
    }
    wmma::store_matrix_sync(sC + j * 16, c, LDS, wmma::mem_row_major);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kTcWarps * 32)
    attention_fwd_tc_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const bool* __restrict__ mask, T* __restrict__ out, float* __restrict__ lse, AttnShape s,
                            float scale, float p, uint64_t seed, uint64_t offset) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();                                                          // bf16 tensor cores need sm_80; never launched
#else
  using L = TcLayout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = reinterpret_cast<T*>(smem + L::q_bytes);
  T* sV = reinterpret_cast<T*>(smem + L::q_bytes + L::k_bytes);
  float* sS = reinterpret_cast<float*>(smem + L::q_bytes + 2 * L::k_bytes);
  T* sP = reinterpret_cast<T*>(smem + L::q_bytes + 2 * L::k_bytes + L::s_bytes);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r = lane >> 1, h = lane & 1;                             // this lane: row r, columns 32h .. 32h+31
  const int64_t bh = blockIdx.y;
  const int b = (int)(bh / s.H);
  const int64_t q0 = (int64_t)blockIdx.x * kTcRows;                  // first query row of the block
  const int64_t i = q0 + warp * 16 + r;                              // this lane's query row
  const T* qb = q + bh * s.Tq * D;
  const T* kb = k + bh * s.Tk * D;
  const T* vb = v + bh * s.Tk * D;
  T* sQw = sQ + warp * 16 * L::ld16;
  float* sSw = sS + warp * 16 * L::lds;
  T* sPw = sP + warp * 16 * L::ldp;
  const int ntiles = (s.Tk + kTcKeys - 1) / kTcKeys;

  load_tile<T, D>(sQ, L::ld16, qb, q0, kTcRows, s.Tq);

  // pass 1: m and l of each row (this lane's half of the columns, merged with its pair after)
  float m = -INFINITY, l = 0.f;
  for (int t = 0; t < ntiles; ++t) {
    __syncthreads();                                                 // the previous tile is used up
    load_tile<T, D>(sK, L::ld16, kb, (int64_t)t * kTcKeys, kTcKeys, s.Tk);
    __syncthreads();
    products_16x64<T, D, L::lds>(sQw, sK, sSw);         // S = Q_w K^T (unscaled)
    __syncwarp();
    float x[32];
    float tmax = -INFINITY;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const int64_t j = (int64_t)t * kTcKeys + 32 * h + c;
      const bool kept = j < s.Tk && (mask == nullptr || mask[(int64_t)b * s.Tk + j]);
      x[c] = kept ? sSw[r * L::lds + 32 * h + c] * scale : -INFINITY;  // s_ij = scale q_i . k_j
      tmax = fmaxf(tmax, x[c]);
    }
    const float m_new = fmaxf(m, tmax);
    if (m_new != -INFINITY) {
      float add = 0.f;
#pragma unroll
      for (int c = 0; c < 32; ++c) add += __expf(x[c] - m_new);
      l = l * __expf(m - m_new) + add;                               // l' = l e^{m - m'} + sum e^{s - m'}
      m = m_new;
    }
    __syncwarp();
  }
  {                                                                  // merge the two halves of the row
    const float m2 = __shfl_xor_sync(0xffffffffu, m, 1), l2 = __shfl_xor_sync(0xffffffffu, l, 1);
    const float mm = fmaxf(m, m2);
    l = mm == -INFINITY ? 0.f : l * __expf(m - mm) + l2 * __expf(m2 - mm);
    m = mm;
  }
  const bool empty = m == -INFINITY;
  const float row_lse = empty ? -INFINITY : m + __logf(l);
  if (h == 0 && i < s.Tq) lse[bh * s.Tq + i] = row_lse;

  // pass 2: P = e^{s - lse} (with dropout) in 16 bits, O += P V on tensor cores
  const uint32_t threshold = dropout_threshold(p);
  const float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[D / 16];
#pragma unroll
  for (int d = 0; d < D / 16; ++d) wmma::fill_fragment(o[d], 0.f);
  for (int t = 0; t < ntiles; ++t) {
    __syncthreads();
    load_tile<T, D>(sK, L::ld16, kb, (int64_t)t * kTcKeys, kTcKeys, s.Tk);
    load_tile<T, D>(sV, L::ld16, vb, (int64_t)t * kTcKeys, kTcKeys, s.Tk);
    __syncthreads();
    products_16x64<T, D, L::lds>(sQw, sK, sSw);         // S = Q_w K^T (unscaled)
    __syncwarp();
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const int64_t j = (int64_t)t * kTcKeys + 32 * h + c;
      const bool kept = !empty && j < s.Tk && (mask == nullptr || mask[(int64_t)b * s.Tk + j]);
      float pij = kept ? __expf(sSw[r * L::lds + 32 * h + c] * scale - row_lse) : 0.f;   // P_ij
      if (p > 0.f && pij != 0.f)                                     // P~_ij = P_ij keep_ij / (1 - p)
        pij = philox_bits(seed, offset, (uint64_t)(bh * s.Tq + i) * s.Tk + j) < threshold ? 0.f : pij * keep_scale;
      sPw[r * L::ldp + 32 * h + c] = from_f<T>(pij);
    }
    __syncwarp();
#pragma unroll
    for (int kk = 0; kk < kTcKeys / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, sPw + kk * 16, L::ldp);
#pragma unroll
      for (int d = 0; d < D / 16; ++d) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
        wmma::load_matrix_sync(bv, sV + kk * 16 * L::ld16 + d * 16, L::ld16);
        wmma::mma_sync(o[d], a, bv, o[d]);                           // O += P~ V
      }
    }
  }
  // O out through this warp's S rows: fragments -> shared (float) -> global (16 bits)
  __syncwarp();
#pragma unroll
  for (int d = 0; d < D / 16; ++d) wmma::store_matrix_sync(sSw + d * 16, o[d], L::lds, wmma::mem_row_major);
  __syncwarp();
  if (i < s.Tq) {
    T* orow = out + (bh * s.Tq + i) * D;
    for (int c = h; c < D; c += 2) orow[c] = from_f<T>(sSw[r * L::lds + c]);
  }
#endif
}

// ------------------------------------------------------------------------------------------
// Backward on tensor cores. A block owns 64 keys (16 per warp) of one (batch, head) and walks the
// query rows in tiles of 64, as FlashAttention-2's backward does. With S = scale Q K^T,
// P = e^{S - lse}, P~ = P keep / (1 - p), O = P~ V and Delta_i = dO_i . O_i:
//   dV_j += sum_i P~_ij dO_i                  (dV = P~^T dO)
//   dP~_ij = dO_i . V_j,  dS_ij = P_ij (dP~_ij keep_ij / (1 - p) - Delta_i)
//   dK_j += scale sum_i dS_ij Q_i             (dK = scale dS^T Q)
//   dQ_i += scale sum_j dS_ij K_j             (dQ = scale dS K)
// dK and dV stay in tensor-core accumulators for the whole walk (each key belongs to one block);
// dQ gets a contribution from every key block, added into a float buffer with atomics and
// converted at the end. The warp holds S^T and dP~^T (its 16 keys x 64 queries), so lane 2r + h
// owns key r and queries 32h .. 32h + 31 of the tile.
// ------------------------------------------------------------------------------------------

template <int D>
struct TcBwdLayout {
  static constexpr int ld16 = D + kPad16;
  static constexpr int ldp = kTcRows + kPad16;                        // P~^T and dS^T rows: 64 queries
  static constexpr int lds = (kTcRows > D ? kTcRows : D) + kPad32;     // S^T, dP~^T rows; dK, dV on the way out
  static constexpr size_t tile16 = (size_t)kTcRows * ld16 * 2;         // one 64-row 16-bit tile (K, V, Q, dO)
  static constexpr size_t s_bytes = (size_t)kTcWarps * 16 * lds * 4;
  static constexpr size_t p_bytes = (size_t)kTcWarps * 16 * ldp * 2;
  static constexpr size_t row_bytes = (size_t)kTcRows * 4;             // lse or Delta of the query tile
  static constexpr size_t total = 4 * tile16 + 2 * s_bytes + 2 * p_bytes + 2 * row_bytes;
};

// Delta_i = dO_i . O_i, one warp per row.
template <typename T>
__global__ void attention_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                                       float* __restrict__ delta, int64_t rows, int D) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;
  float part = 0.f;
  for (int d = threadIdx.x & 31; d < D; d += 32) part += to_f(dout[row * D + d]) * to_f(out[row * D + d]);
  part = warp_sum(part);
  if ((threadIdx.x & 31) == 0) delta[row] = part;
}

template <typename T, int D>
__global__ void __launch_bounds__(kTcWarps * 32)
    attention_bwd_tc_kernel(const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,
                            const T* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
                            const bool* __restrict__ mask, float* __restrict__ dq_acc, T* __restrict__ dk,
                            T* __restrict__ dv, AttnShape s, float scale, float p, uint64_t seed, uint64_t offset) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using L = TcBwdLayout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = reinterpret_cast<T*>(smem + L::tile16);
  T* sQ = reinterpret_cast<T*>(smem + 2 * L::tile16);
  T* sDO = reinterpret_cast<T*>(smem + 3 * L::tile16);
  float* sS = reinterpret_cast<float*>(smem + 4 * L::tile16);
  float* sDP = reinterpret_cast<float*>(smem + 4 * L::tile16 + L::s_bytes);
  T* sP = reinterpret_cast<T*>(smem + 4 * L::tile16 + 2 * L::s_bytes);
  T* sDS = reinterpret_cast<T*>(smem + 4 * L::tile16 + 2 * L::s_bytes + L::p_bytes);
  float* sLse = reinterpret_cast<float*>(smem + 4 * L::tile16 + 2 * L::s_bytes + 2 * L::p_bytes);
  float* sDelta = sLse + kTcRows;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r = lane >> 1, h = lane & 1;                             // this lane: key r, queries 32h .. 32h+31
  const int64_t bh = blockIdx.y;
  const int b = (int)(bh / s.H);
  const int64_t k0 = (int64_t)blockIdx.x * kTcKeys;
  const int64_t j = k0 + warp * 16 + r;                              // this lane's key
  const bool key_kept = j < s.Tk && (mask == nullptr || mask[(int64_t)b * s.Tk + j]);
  const uint32_t threshold = dropout_threshold(p);
  const float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  T* sKw = sK + warp * 16 * L::ld16;
  T* sVw = sV + warp * 16 * L::ld16;
  float* sSw = sS + warp * 16 * L::lds;
  float* sDPw = sDP + warp * 16 * L::lds;
  T* sPw = sP + warp * 16 * L::ldp;
  T* sDSw = sDS + warp * 16 * L::ldp;

  load_tile<T, D>(sK, L::ld16, k + bh * s.Tk * D, k0, kTcKeys, s.Tk);
  load_tile<T, D>(sV, L::ld16, v + bh * s.Tk * D, k0, kTcKeys, s.Tk);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk_f[D / 16], dv_f[D / 16];
#pragma unroll
  for (int d = 0; d < D / 16; ++d) {
    wmma::fill_fragment(dk_f[d], 0.f);
    wmma::fill_fragment(dv_f[d], 0.f);
  }
  const int ntiles = (s.Tq + kTcRows - 1) / kTcRows;
  for (int t = 0; t < ntiles; ++t) {
    const int64_t i0 = (int64_t)t * kTcRows;
    __syncthreads();                                                 // the previous query tile is used up
    load_tile<T, D>(sQ, L::ld16, q + bh * s.Tq * D, i0, kTcRows, s.Tq);
    load_tile<T, D>(sDO, L::ld16, dout + bh * s.Tq * D, i0, kTcRows, s.Tq);
    for (int x = threadIdx.x; x < kTcRows; x += blockDim.x) {
      const bool in = i0 + x < s.Tq;
      sLse[x] = in ? lse[bh * s.Tq + i0 + x] : -INFINITY;            // rows past Tq: P = 0
      sDelta[x] = in ? delta[bh * s.Tq + i0 + x] : 0.f;
    }
    __syncthreads();
    products_16x64<T, D, L::lds>(sKw, sQ, sSw);                      // S^T = K_w Q^T (unscaled)
    products_16x64<T, D, L::lds>(sVw, sDO, sDPw);                    // dP~^T = V_w dO^T
    __syncwarp();
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const int col = 32 * h + c;
      const float lse_i = sLse[col];
      float pij = 0.f, ds = 0.f, mult = 1.f;
      if (key_kept && lse_i != -INFINITY) {
        pij = __expf(sSw[r * L::lds + col] * scale - lse_i);        // P_ij, recomputed
        if (p > 0.f)
          mult = philox_bits(seed, offset, (uint64_t)(bh * s.Tq + i0 + col) * s.Tk + j) < threshold ? 0.f
                                                                                              : keep_scale;
        ds = pij * (sDPw[r * L::lds + col] * mult - sDelta[col]);   // dS_ij = P_ij (dP_ij - Delta_i)
      }
      sPw[r * L::ldp + col] = from_f<T>(pij * mult);                 // P~^T
      sDSw[r * L::ldp + col] = from_f<T>(ds);                        // dS^T
    }
    __syncwarp();
#pragma unroll
    for (int kk = 0; kk < kTcRows / 16; ++kk) {                      // over 16-query slices of the tile
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa, da;
      wmma::load_matrix_sync(pa, sPw + kk * 16, L::ldp);
      wmma::load_matrix_sync(da, sDSw + kk * 16, L::ldp);
#pragma unroll
      for (int d = 0; d < D / 16; ++d) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bo, bq;
        wmma::load_matrix_sync(bo, sDO + kk * 16 * L::ld16 + d * 16, L::ld16);
        wmma::load_matrix_sync(bq, sQ + kk * 16 * L::ld16 + d * 16, L::ld16);
        wmma::mma_sync(dv_f[d], pa, bo, dv_f[d]);                    // dV_w += P~^T dO
        wmma::mma_sync(dk_f[d], da, bq, dk_f[d]);                    // dK_w += dS^T Q (scaled at the end)
      }
    }
    // dQ (this tile's 64 rows) += dS K_w: dS is dS^T read column-major; through sSw to the atomics
#pragma unroll
    for (int iq = 0; iq < kTcRows / 16; ++iq) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
      wmma::load_matrix_sync(a, sDSw + iq * 16, L::ldp);
#pragma unroll
      for (int d = 0; d < D / 16; ++d) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bk;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
        wmma::fill_fragment(c, 0.f);
        wmma::load_matrix_sync(bk, sKw + d * 16, L::ld16);
        wmma::mma_sync(c, a, bk, c);
        __syncwarp();
        wmma::store_matrix_sync(sSw, c, L::lds, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int row = e >> 4, col = e & 15;
          const int64_t i = i0 + iq * 16 + row;
          if (i < s.Tq) atomicAdd(dq_acc + (bh * s.Tq + i) * D + d * 16 + col, sSw[row * L::lds + col]);
        }
      }
    }
  }
  // dK = scale dK_w, dV = dV_w out through sSw
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
    __syncwarp();
#pragma unroll
    for (int d = 0; d < D / 16; ++d)
      wmma::store_matrix_sync(sSw + d * 16, pass == 0 ? dk_f[d] : dv_f[d], L::lds, wmma::mem_row_major);
    __syncwarp();
    if (j < s.Tk) {
      T* dst = (pass == 0 ? dk : dv) + (bh * s.Tk + j) * D;
      const float f = pass == 0 ? scale : 1.f;
      for (int c = h; c < D; c += 2) dst[c] = from_f<T>(sSw[r * L::lds + c] * f);
    }
  }
#endif
}

template <typename T, int D>
static cudaError_t launch_tc_bwd(const void* dout, const void* q, const void* k, const void* v, const void* out,
                                 const float* lse, const bool* mask, void* dq, void* dk, void* dv, float* scratch,
                                 AttnShape s, float scale, float p, uint64_t seed, uint64_t offset,
                                 cudaStream_t stream) {
  const int64_t rows = (int64_t)s.B * s.H * s.Tq, nq = rows * D;
  float* dq_acc = scratch;
  float* delta = scratch + nq;
  cudaError_t err = cudaMemsetAsync(dq_acc, 0, nq * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  attention_delta_kernel<T><<<(unsigned)((rows + 7) / 8), 256, 0, stream>>>((const T*)dout, (const T*)out, delta,
                                                                           rows, D);
  constexpr size_t bytes = TcBwdLayout<D>::total;
  auto kernel = attention_bwd_tc_kernel<T, D>;
  if (bytes > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (err != cudaSuccess) return err;
  }
  dim3 grid((unsigned)((s.Tk + kTcKeys - 1) / kTcKeys), (unsigned)(s.B * s.H));
  kernel<<<grid, kTcWarps * 32, bytes, stream>>>((const T*)dout, (const T*)q, (const T*)k, (const T*)v, lse, delta,
                                                 mask, dq_acc, (T*)dk, (T*)dv, s, scale, p, seed, offset);
  scale_cast_kernel<T><<<grid_for(nq), kGridThreads, 0, stream>>>(dq_acc, (T*)dq, nq, scale);
  return cudaGetLastError();
}

template <typename T, int D>
static cudaError_t launch_tc(const void* q, const void* k, const void* v, const bool* mask, void* out, float* lse,
                             AttnShape s, float scale, float p, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  constexpr size_t bytes = TcLayout<D>::total;
  auto kernel = attention_fwd_tc_kernel<T, D>;
  if (bytes > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (err != cudaSuccess) return err;
  }
  dim3 grid((unsigned)((s.Tq + kTcRows - 1) / kTcRows), (unsigned)(s.B * s.H));
  kernel<<<grid, kTcWarps * 32, bytes, stream>>>((const T*)q, (const T*)k, (const T*)v, mask, (T*)out, lse, s, scale,
                                                 p, seed, offset);
  return cudaGetLastError();
}

bool attention_tc_supported(DType dt, int D) {
  if (dt == DType::F32 || (D != 32 && D != 64 && D != 128)) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

cudaError_t attention_fwd_tc(DType dt, const void* q, const void* k, const void* v, const bool* mask, void* out,
                             float* lse, AttnShape s, float scale, float p, uint64_t seed, uint64_t offset,
                             cudaStream_t stream) {
  const bool half = dt == DType::F16;
  switch (s.D) {
    case 32:
      return half ? launch_tc<__half, 32>(q, k, v, mask, out, lse, s, scale, p, seed, offset, stream)
                  : launch_tc<__nv_bfloat16, 32>(q, k, v, mask, out, lse, s, scale, p, seed, offset, stream);
    case 64:
      return half ? launch_tc<__half, 64>(q, k, v, mask, out, lse, s, scale, p, seed, offset, stream)
                  : launch_tc<__nv_bfloat16, 64>(q, k, v, mask, out, lse, s, scale, p, seed, offset, stream);
    case 128:
      return half ? launch_tc<__half, 128>(q, k, v, mask, out, lse, s, scale, p, seed, offset, stream)
                  : launch_tc<__nv_bfloat16, 128>(q, k, v, mask, out, lse, s, scale, p, seed, offset, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

int64_t attention_bwd_tc_scratch(AttnShape s) { return (int64_t)s.B * s.H * s.Tq * (s.D + 1); }

cudaError_t attention_bwd_tc(DType dt, const void* dout, const void* q, const void* k, const void* v, const void* out,
                             const float* lse, const bool* mask, void* dq, void* dk, void* dv, float* scratch,
                             AttnShape s, float scale, float p, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  const bool half = dt == DType::F16;
#define MINIFT_TC_BWD(TT, DD) \
  launch_tc_bwd<TT, DD>(dout, q, k, v, out, lse, mask, dq, dk, dv, scratch, s, scale, p, seed, offset, stream)
  switch (s.D) {
    case 32: return half ? MINIFT_TC_BWD(__half, 32) : MINIFT_TC_BWD(__nv_bfloat16, 32);
    case 64: return half ? MINIFT_TC_BWD(__half, 64) : MINIFT_TC_BWD(__nv_bfloat16, 64);
    case 128: return half ? MINIFT_TC_BWD(__half, 128) : MINIFT_TC_BWD(__nv_bfloat16, 128);
    default: return cudaErrorInvalidValue;
  }
#undef MINIFT_TC_BWD
}

}  // namespace cuda
}  // namespace minift
