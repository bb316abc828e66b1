// Attention on tensor cores (version 3), forward and backward, float16/bfloat16, head dim 32, 64 or
// 128, sm_80+: FlashAttention-2's plan, with the tensor-core instructions written out.
//
// Version 2 used WMMA, whose accumulators hide which thread holds which element. It could not
// rescale a row of O in registers, so it walked the keys twice (max and sum first, then P V) and
// passed every score tile through shared memory. Here the multiplies are PTX's
// mma.sync.m16n8k16 (A 16x16 row-major, B 16x8 column-major, C 16x8 float), whose register layout
// is documented: with g = lane / 4 and t = lane % 4, a thread holds
//   C: rows g and g + 8, columns 2t and 2t + 1      (c0 c1 on row g, c2 c3 on row g + 8)
//   A: rows g and g + 8, columns 2t, 2t + 1 and 2t + 8, 2t + 9   (a0 a1 a2 a3, pairs of 16 bits)
//   B: rows 2t, 2t + 1 and 2t + 8, 2t + 9 of column g             (b0 b1)
// Two things follow. A thread knows the rows of its scores, so the online softmax of version 1
// (m' = max(m, s), l' = l e^{m - m'} + sum e^{s - m'}, O' = O e^{m - m'} + P V) runs on the
// accumulators in place, one pass over the keys. And the C layout of two neighbouring 16x8 score
// tiles is the A layout of a 16x16 operand, so P (rounded to 16 bits) goes from the S = Q K^T
// accumulators straight into O += P V without touching shared memory.
// Operands come from shared memory with ldmatrix (eight 8x8 16-bit matrices' rows per x4 call;
// .trans transposes on the way, for the B operands stored row-major, V and dO and K), and tiles
// arrive there with cp.async, the next key tile loading while the current one is multiplied.
//
// Blocks: 4 warps, 16 query rows each (forward and dQ) or 16 keys each (dK/dV), tiles of 64 rows
// with rows padded by 16 bytes, so the eight row addresses of an ldmatrix fall in different banks.
// The exps are base 2: s log2(e) is folded into the scale, lse goes out in natural units.
//
// Backward, with S = scale Q K^T, P = e^{S - lse}, P~ = P keep / (1 - p), O = P~ V, Delta_i = dO_i . O_i:
//   dV = P~^T dO,   dP~ = dO V^T,   dS = P (dP~ keep / (1 - p) - Delta),   dK = scale dS^T Q,   dQ = scale dS K.
// Two kernels, no atomics: one per key tile (dK, dV: S^T, dP~^T and two products per query tile)
// and one per query tile (dQ: S, dP~ and one product per key tile). That recomputes S and dP~ once
// more than FlashAttention-2, which adds dQ from every key block with float atomics, and in return
// the result is the same on every run and no float dQ buffer is needed.
//
// Masked keys, keys past Tk and rows past Tq contribute nothing; a row with no kept key gives O = 0
// and lse = -inf, as on the CPU. Dropout draws the Philox bits of element (row, j) -> row * Tk + j,
// the same stream as the CPU and version 1. No torch header, so `nvcc -c` compiles this file.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "../philox.h"
#include "common.cuh"
#include "kernels.h"

namespace minift {
namespace cuda {
namespace {

constexpr int kTile = 64;                 // query rows or keys per tile
constexpr int kWarps = 4;                 // 16 rows each
constexpr int kThreads = kWarps * 32;
constexpr int kPad = 8;                   // 16-bit elements of padding per shared-memory row
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D>
struct Tile {
  static constexpr int ld = D + kPad;                                  // row stride, elements
  static constexpr int elems = kTile * ld;
  static constexpr size_t bytes = (size_t)elems * 2;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define MINIFT_SM80 0
#else
#define MINIFT_SM80 1
#endif

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// 16 bytes global -> shared without passing through registers; zeros when !valid.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if MINIFT_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if MINIFT_SM80
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if MINIFT_SM80
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

// Four 8x8 16-bit matrices: lanes 8i .. 8i + 7 give the row addresses of matrix i, and register i of
// lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix i (of its transpose with .trans).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
#if MINIFT_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
#if MINIFT_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
#endif
}

// c += a b for one 16x8x16 tile, float accumulators.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if MINIFT_SM80
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if MINIFT_SM80
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats rounded to 16 bits, lo in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
}

// The A operand of a 16x16 product whose rows are this warp's 16 and whose 16 columns are the
// accumulator tiles c[2kk] and c[2kk + 1] (16x8 each): the C -> A identity of the layouts above.
template <typename T>
__device__ __forceinline__ void a_from_c(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// Rows [row0, row0 + 64) of a (rows, D) matrix into a padded shared tile, rows >= limit as zeros.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row0, int64_t limit) {
  constexpr int kChunks = D / 8;                                       // 16-byte pieces per row
  for (int i = threadIdx.x; i < kTile * kChunks; i += kThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const bool valid = row0 + r < limit;
    cp_async16(dst + r * Tile<D>::ld + c, valid ? src + (row0 + r) * D + c : src, valid);
  }
}

// A operand (16 rows x 16 columns kd*16 ..) of rows r0 .. r0 + 15 of a shared tile.
template <int D, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int r0, int kd, int lane) {
  ldsm_x4(a, tile + (r0 + (lane & 15)) * Tile<D>::ld + kd * 16 + (lane >> 4) * 8);
}

// acc[8][4] = A B^T for A = 16 rows (fragments a[kd]) and B = the 64 rows of a shared tile, each of
// D columns: S = Q K^T (B = K), dP~ = dO V^T (B = V), S^T = K Q^T, dP~^T = V dO^T. The 64 rows of
// B are 8 column tiles of the result; one ldmatrix x4 gives the (b0, b1) of two of them.
template <typename T, int D>
__device__ __forceinline__ void products_abt(float (&acc)[8][4], const uint32_t (&a)[D / 16][4], const T* b_tile,
                                             int lane) {
  zero(acc);
#pragma unroll
  for (int kd = 0; kd < D / 16; ++kd)
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldsm_x4(b, b_tile + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * Tile<D>::ld + kd * 16 + ((lane >> 3) & 1) * 8);
      mma<T>(acc[2 * np], a[kd], b[0], b[1]);
      mma<T>(acc[2 * np + 1], a[kd], b[2], b[3]);
    }
}

// out[D/8][4] += P B for P = 16 x 64 accumulator tiles p[8][4] (rounded to 16 bits) and B = a shared
// 64 x D tile read transposed: O += P~ V, dV += P~^T dO, dK += dS^T Q, dQ += dS K.
template <typename T, int D>
__device__ __forceinline__ void products_pb(float (&out)[D / 8][4], const float (&p)[8][4], const T* b_tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t a[4];
    a_from_c<T>(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      ldsm_x4_trans(b, b_tile + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Tile<D>::ld + dp * 16 + (lane >> 4) * 8);
      mma<T>(out[2 * dp], a, b[0], b[1]);
      mma<T>(out[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// 0 for a kept key of the tile starting at j0, -inf for a masked one or one past Tk; threads 0..63.
__device__ __forceinline__ void load_key_bias(float* bias, const bool* mrow, int64_t j0, int64_t Tk) {
  if (threadIdx.x < kTile) {
    const int64_t j = j0 + threadIdx.x;
    bias[threadIdx.x] = j < Tk && (mrow == nullptr || mrow[j]) ? 0.f : -INFINITY;
  }
}

// Key tile t (K, V and the mask's bias) into buffer buf of the double-buffered shared tiles.
template <typename T, int D>
__device__ __forceinline__ void load_key_tile(T* sK, T* sV, float* sBias, const T* kb, const T* vb, const bool* mrow,
                                              int t, int buf, int64_t Tk) {
  load_tile<T, D>(sK + buf * Tile<D>::elems, kb, (int64_t)t * kTile, Tk);
  load_tile<T, D>(sV + buf * Tile<D>::elems, vb, (int64_t)t * kTile, Tk);
  load_key_bias(sBias + buf * kTile, mrow, (int64_t)t * kTile, Tk);
}

// This thread's part of one output row: row r (0: g, 1: g + 8) of the accumulator tiles, times f,
// in 16 bits, two columns (2t, 2t + 1) per tile.
template <typename T, int D>
__device__ __forceinline__ void store_row(T* dst, const float (&acc)[D / 8][4], int r, float f, int tq) {
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
    *reinterpret_cast<uint32_t*>(dst + dt * 8 + 2 * tq) = pack2<T>(acc[dt][2 * r] * f, acc[dt][2 * r + 1] * f);
}

// The dropout multiplier of element (row, j) of head bh: 0 or 1 / (1 - p).
__device__ __forceinline__ float dropout_mult(int64_t bh, int64_t row, int64_t j, const AttnShape& s,
                                              uint64_t seed, uint64_t offset, uint32_t threshold, float keep_scale) {
  return philox_bits(seed, offset, (uint64_t)(bh * s.Tq + row) * s.Tk + j) < threshold ? 0.f : keep_scale;
}

template <typename T, int D>
struct FwdSmem {
  static constexpr size_t bytes = 5 * Tile<D>::bytes + 2 * kTile * sizeof(float);   // Q, 2 x (K, V), 2 x bias
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    attention_fwd_v3_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const bool* __restrict__ mask, T* __restrict__ out, float* __restrict__ lse, AttnShape s,
                            float scale, float p, uint64_t seed, uint64_t offset) {
#if !MINIFT_SM80
  __trap();                                                          // sm_80 instructions; never launched
#else
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + Tile<D>::elems;                                       // two buffers each
  T* sV = sK + 2 * Tile<D>::elems;
  float* sBias = reinterpret_cast<float*>(sV + 2 * Tile<D>::elems);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int64_t bh = blockIdx.x;
  const int64_t q0 = (int64_t)blockIdx.y * kTile;
  const T* kb = k + bh * s.Tk * D;
  const T* vb = v + bh * s.Tk * D;
  const bool* mrow = mask == nullptr ? nullptr : mask + (bh / s.H) * s.Tk;
  const int ntiles = (s.Tk + kTile - 1) / kTile;

  load_tile<T, D>(sQ, q + bh * s.Tq * D, q0, s.Tq);
  if (ntiles > 0) load_key_tile<T, D>(sK, sV, sBias, kb, vb, mrow, 0, 0, s.Tk);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kd = 0; kd < D / 16; ++kd) load_a<D>(qf[kd], sQ, warp * 16, kd, lane);

  const float c2 = scale * kLog2e;                                   // s log2(e): exps in base 2
  const uint32_t threshold = dropout_threshold(p);
  const float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  const int64_t row0 = q0 + warp * 16 + g;                           // this thread's rows: row0, row0 + 8
  float o[D / 8][4];
  zero(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};            // running max (base 2) and sum, per row

  for (int t = 0; t < ntiles; ++t) {
    const int buf = t & 1;
    if (t > 0) {
      cp_async_wait_all();                                           // tile t has landed
      __syncthreads();                                               // and every warp is done with tile t - 1
    }
    if (t + 1 < ntiles) {                                            // tile t + 1 loads during this one
      load_key_tile<T, D>(sK, sV, sBias, kb, vb, mrow, t + 1, buf ^ 1, s.Tk);
      cp_async_commit();
    }
    const T* sKt = sK + buf * Tile<D>::elems;
    const T* sVt = sV + buf * Tile<D>::elems;
    const float* bias = sBias + buf * kTile;

    float sc[8][4];
    products_abt<T, D>(sc, qf, sKt, lane);                           // S = Q_w K^T, unscaled
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = sc[nt][e] * c2 + bias[nt * 8 + 2 * tq + (e & 1)];   // -inf for a masked key
        sc[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    float base[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {                                    // the row's max over its 4 threads
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float mn = fmaxf(m[r], mx[r]);
      base[r] = mn == -INFINITY ? 0.f : mn;                          // nothing kept yet: every e^{...} is 0
      alpha[r] = exp2f(m[r] - base[r]);                              // e^{m - m'}
      m[r] = mn;
    }
    float add[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pe = exp2f(sc[nt][e] - base[e >> 1]);
        add[e >> 1] += pe;
        if (p > 0.f && pe != 0.f)                                    // P~ = P keep / (1 - p); l keeps P
          pe *= dropout_mult(bh, row0 + 8 * (e >> 1), (int64_t)t * kTile + nt * 8 + 2 * tq + (e & 1), s, seed,
                             offset, threshold, keep_scale);
        sc[nt][e] = pe;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + add[r];     // this thread's part of the row sum
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }
    products_pb<T, D>(o, sc, sVt, lane);                             // O += P~ V
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {                                      // the row sum over its 4 threads
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int64_t row = row0 + 8 * r;
    if (row >= s.Tq) continue;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;                 // a row with no kept key: O = 0
    store_row<T, D>(out + (bh * s.Tq + row) * D, o, r, inv, tq);
    if (tq == 0) lse[bh * s.Tq + row] = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
  }
#endif
}

// Delta_i = dO_i . O_i, one warp per row.
template <typename T>
__global__ void attention_delta_v3_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                                          float* __restrict__ delta, int64_t rows, int D) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;
  float part = 0.f;
  for (int d = threadIdx.x & 31; d < D; d += 32) part += to_f(dout[row * D + d]) * to_f(out[row * D + d]);
  part = warp_sum(part);
  if ((threadIdx.x & 31) == 0) delta[row] = part;
}

// lse (natural units) -> base 2 for the recomputed P; +inf for rows past Tq and rows with no kept
// key, so that e^{s - lse} is 0 there.
__device__ __forceinline__ float lse_base2(const float* lse, int64_t bh, int64_t row, const AttnShape& s) {
  if (row >= s.Tq) return INFINITY;
  const float x = lse[bh * s.Tq + row];
  return x == -INFINITY ? INFINITY : x * kLog2e;
}

template <typename T, int D>
struct BwdKvSmem {   // K, V, 2 x (Q, dO), 2 x (lse, Delta)
  static constexpr size_t bytes = 6 * Tile<D>::bytes + 4 * kTile * sizeof(float);
};

// dK and dV of one tile of 64 keys; warp w owns keys k0 + 16 w .. + 15.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    attention_bwd_kv_v3_kernel(const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, const float* __restrict__ lse,
                               const float* __restrict__ delta, const bool* __restrict__ mask, T* __restrict__ dk,
                               T* __restrict__ dv, AttnShape s, float scale, float p, uint64_t seed,
                               uint64_t offset) {
#if !MINIFT_SM80
  __trap();
#else
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + Tile<D>::elems;
  T* sQ = sV + Tile<D>::elems;                                       // two buffers each
  T* sDO = sQ + 2 * Tile<D>::elems;
  float* sLse = reinterpret_cast<float*>(sDO + 2 * Tile<D>::elems);  // base 2, +inf past Tq
  float* sDelta = sLse + 2 * kTile;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int64_t bh = blockIdx.x;
  const int64_t k0 = (int64_t)blockIdx.y * kTile;
  const T* qb = q + bh * s.Tq * D;
  const T* dob = dout + bh * s.Tq * D;
  const bool* mrow = mask == nullptr ? nullptr : mask + (bh / s.H) * s.Tk;
  const int ntiles = (s.Tq + kTile - 1) / kTile;
  auto load_rows = [&](int t, int buf) {                             // query tile t: Q, dO, lse, Delta
    load_tile<T, D>(sQ + buf * Tile<D>::elems, qb, (int64_t)t * kTile, s.Tq);
    load_tile<T, D>(sDO + buf * Tile<D>::elems, dob, (int64_t)t * kTile, s.Tq);
    if (threadIdx.x < kTile) {
      const int64_t i = (int64_t)t * kTile + threadIdx.x;
      sLse[buf * kTile + threadIdx.x] = lse_base2(lse, bh, i, s);
      sDelta[buf * kTile + threadIdx.x] = i < s.Tq ? delta[bh * s.Tq + i] : 0.f;
    }
  };
  load_tile<T, D>(sK, k + bh * s.Tk * D, k0, s.Tk);
  load_tile<T, D>(sV, v + bh * s.Tk * D, k0, s.Tk);
  if (ntiles > 0) load_rows(0, 0);
  cp_async_commit();

  const float c2 = scale * kLog2e;
  const uint32_t threshold = dropout_threshold(p);
  const float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  const int64_t key0 = k0 + warp * 16 + g;                           // this thread's keys: key0, key0 + 8
  bool kept[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = key0 + 8 * r;
    kept[r] = j < s.Tk && (mrow == nullptr || mrow[j]);
  }
  float dk_acc[D / 8][4], dv_acc[D / 8][4];
  zero(dk_acc);
  zero(dv_acc);

  for (int t = 0; t < ntiles; ++t) {
    const int buf = t & 1;
    cp_async_wait_all();
    __syncthreads();
    if (t + 1 < ntiles) {
      load_rows(t + 1, buf ^ 1);
      cp_async_commit();
    }
    const T* sQt = sQ + buf * Tile<D>::elems;
    const T* sDOt = sDO + buf * Tile<D>::elems;
    const float* lse2 = sLse + buf * kTile;
    const float* dlt = sDelta + buf * kTile;

    uint32_t af[D / 16][4];
    float st[8][4], dpt[8][4];
#pragma unroll
    for (int kd = 0; kd < D / 16; ++kd) load_a<D>(af[kd], sK, warp * 16, kd, lane);
    products_abt<T, D>(st, af, sQt, lane);                           // S^T = K_w Q^T, unscaled
#pragma unroll
    for (int kd = 0; kd < D / 16; ++kd) load_a<D>(af[kd], sV, warp * 16, kd, lane);
    products_abt<T, D>(dpt, af, sDOt, lane);                         // dP~^T = V_w dO^T
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * tq + (e & 1);                   // the query, within the tile
        float pij = kept[e >> 1] ? exp2f(st[nt][e] * c2 - lse2[col]) : 0.f;   // P_ij, recomputed
        float mult = 1.f;
        if (p > 0.f && pij != 0.f)
          mult = dropout_mult(bh, (int64_t)t * kTile + col, key0 + 8 * (e >> 1), s, seed, offset, threshold,
                              keep_scale);
        dpt[nt][e] = pij * (dpt[nt][e] * mult - dlt[col]);          // dS^T
        st[nt][e] = pij * mult;                                      // P~^T
      }
    products_pb<T, D>(dv_acc, st, sDOt, lane);                       // dV_w += P~^T dO
    products_pb<T, D>(dk_acc, dpt, sQt, lane);                       // dK_w += dS^T Q
  }
  cp_async_wait_all();                                               // (no query tile: K and V still in flight)

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = key0 + 8 * r;
    if (j >= s.Tk) continue;
    T* dkrow = dk + (bh * s.Tk + j) * D;
    T* dvrow = dv + (bh * s.Tk + j) * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {   // dK and dV column by column: store_row twice spills 348 bytes at D = 128
      *reinterpret_cast<uint32_t*>(dkrow + dt * 8 + 2 * tq) =
          pack2<T>(dk_acc[dt][2 * r] * scale, dk_acc[dt][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(dvrow + dt * 8 + 2 * tq) = pack2<T>(dv_acc[dt][2 * r], dv_acc[dt][2 * r + 1]);
    }
  }
#endif
}

template <typename T, int D>
struct BwdQSmem {   // Q, dO, 2 x (K, V), 2 x bias
  static constexpr size_t bytes = 6 * Tile<D>::bytes + 2 * kTile * sizeof(float);
};

// dQ of one tile of 64 query rows; warp w owns rows q0 + 16 w .. + 15.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    attention_bwd_q_v3_kernel(const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
                              const bool* __restrict__ mask, T* __restrict__ dq, AttnShape s, float scale, float p,
                              uint64_t seed, uint64_t offset) {
#if !MINIFT_SM80
  __trap();
#else
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sDO = sQ + Tile<D>::elems;
  T* sK = sDO + Tile<D>::elems;                                      // two buffers each
  T* sV = sK + 2 * Tile<D>::elems;
  float* sBias = reinterpret_cast<float*>(sV + 2 * Tile<D>::elems);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int64_t bh = blockIdx.x;
  const int64_t q0 = (int64_t)blockIdx.y * kTile;
  const T* kb = k + bh * s.Tk * D;
  const T* vb = v + bh * s.Tk * D;
  const bool* mrow = mask == nullptr ? nullptr : mask + (bh / s.H) * s.Tk;
  const int ntiles = (s.Tk + kTile - 1) / kTile;

  load_tile<T, D>(sQ, q + bh * s.Tq * D, q0, s.Tq);
  load_tile<T, D>(sDO, dout + bh * s.Tq * D, q0, s.Tq);
  if (ntiles > 0) load_key_tile<T, D>(sK, sV, sBias, kb, vb, mrow, 0, 0, s.Tk);
  cp_async_commit();

  const float c2 = scale * kLog2e;
  const uint32_t threshold = dropout_threshold(p);
  const float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  const int64_t row0 = q0 + warp * 16 + g;                           // this thread's rows: row0, row0 + 8
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lse2[r] = lse_base2(lse, bh, row0 + 8 * r, s);
    dlt[r] = row0 + 8 * r < s.Tq ? delta[bh * s.Tq + row0 + 8 * r] : 0.f;
  }
  float dq_acc[D / 8][4];
  zero(dq_acc);
  uint32_t qf[D / 16][4], dof[D / 16][4];

  for (int t = 0; t < ntiles; ++t) {
    const int buf = t & 1;
    cp_async_wait_all();
    __syncthreads();
    if (t == 0) {
#pragma unroll
      for (int kd = 0; kd < D / 16; ++kd) {
        load_a<D>(qf[kd], sQ, warp * 16, kd, lane);
        load_a<D>(dof[kd], sDO, warp * 16, kd, lane);
      }
    }
    if (t + 1 < ntiles) {
      load_key_tile<T, D>(sK, sV, sBias, kb, vb, mrow, t + 1, buf ^ 1, s.Tk);
      cp_async_commit();
    }
    const T* sKt = sK + buf * Tile<D>::elems;
    const T* sVt = sV + buf * Tile<D>::elems;
    const float* bias = sBias + buf * kTile;

    float sc[8][4], dp[8][4];
    products_abt<T, D>(sc, qf, sKt, lane);                           // S = Q_w K^T, unscaled
    products_abt<T, D>(dp, dof, sVt, lane);                          // dP~ = dO_w V^T
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * tq + (e & 1);                   // the key, within the tile
        const float pij = exp2f(sc[nt][e] * c2 + bias[col] - lse2[e >> 1]);   // P_ij, recomputed
        float mult = 1.f;
        if (p > 0.f && pij != 0.f)
          mult = dropout_mult(bh, row0 + 8 * (e >> 1), (int64_t)t * kTile + col, s, seed, offset, threshold,
                              keep_scale);
        sc[nt][e] = pij * (dp[nt][e] * mult - dlt[e >> 1]);          // dS
      }
    products_pb<T, D>(dq_acc, sc, sKt, lane);                        // dQ_w += dS K
  }
  cp_async_wait_all();                                               // (no key tile: Q and dO still in flight)

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + 8 * r;
    if (row >= s.Tq) continue;
    store_row<T, D>(dq + (bh * s.Tq + row) * D, dq_acc, r, scale, tq);
  }
#endif
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

// Grid: (batch x head) on x, which has no 65535 limit, and row tiles on y.
inline dim3 grid_of(const AttnShape& s, int rows) {
  return dim3((unsigned)((int64_t)s.B * s.H), (unsigned)((rows + kTile - 1) / kTile));
}

template <typename T, int D>
cudaError_t launch_fwd(const void* q, const void* k, const void* v, const bool* mask, void* out, float* lse,
                       AttnShape s, float scale, float p, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  constexpr size_t bytes = FwdSmem<T, D>::bytes;
  auto kernel = attention_fwd_v3_kernel<T, D>;
  cudaError_t err = allow_smem(kernel, bytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid_of(s, s.Tq), kThreads, bytes, stream>>>((const T*)q, (const T*)k, (const T*)v, mask, (T*)out, lse, s,
                                                        scale, p, seed, offset);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_bwd(const void* dout, const void* q, const void* k, const void* v, const void* out,
                       const float* lse, const bool* mask, void* dq, void* dk, void* dv, float* delta, AttnShape s,
                       float scale, float p, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  const int64_t rows = (int64_t)s.B * s.H * s.Tq;
  if (rows > 0)
    attention_delta_v3_kernel<T><<<(unsigned)((rows + 7) / 8), 256, 0, stream>>>((const T*)dout, (const T*)out,
                                                                                 delta, rows, D);
  auto kv = attention_bwd_kv_v3_kernel<T, D>;
  auto qk = attention_bwd_q_v3_kernel<T, D>;
  cudaError_t err = allow_smem(kv, BwdKvSmem<T, D>::bytes);
  if (err == cudaSuccess) err = allow_smem(qk, BwdQSmem<T, D>::bytes);
  if (err != cudaSuccess) return err;
  if (s.Tk > 0)
    kv<<<grid_of(s, s.Tk), kThreads, BwdKvSmem<T, D>::bytes, stream>>>(
        (const T*)dout, (const T*)q, (const T*)k, (const T*)v, lse, delta, mask, (T*)dk, (T*)dv, s, scale, p, seed,
        offset);
  if (s.Tq > 0)
    qk<<<grid_of(s, s.Tq), kThreads, BwdQSmem<T, D>::bytes, stream>>>(
        (const T*)dout, (const T*)q, (const T*)k, (const T*)v, lse, delta, mask, (T*)dq, s, scale, p, seed, offset);
  return cudaGetLastError();
}

}  // namespace

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
  if ((int64_t)s.B * s.H == 0 || s.Tq == 0) return cudaSuccess;
  const bool half = dt == DType::F16;
#define MINIFT_V3_FWD(TT, DD) launch_fwd<TT, DD>(q, k, v, mask, out, lse, s, scale, p, seed, offset, stream)
  switch (s.D) {
    case 32: return half ? MINIFT_V3_FWD(__half, 32) : MINIFT_V3_FWD(__nv_bfloat16, 32);
    case 64: return half ? MINIFT_V3_FWD(__half, 64) : MINIFT_V3_FWD(__nv_bfloat16, 64);
    case 128: return half ? MINIFT_V3_FWD(__half, 128) : MINIFT_V3_FWD(__nv_bfloat16, 128);
    default: return cudaErrorInvalidValue;
  }
#undef MINIFT_V3_FWD
}

int64_t attention_bwd_tc_scratch(AttnShape s) { return (int64_t)s.B * s.H * s.Tq; }   // Delta

cudaError_t attention_bwd_tc(DType dt, const void* dout, const void* q, const void* k, const void* v, const void* out,
                             const float* lse, const bool* mask, void* dq, void* dk, void* dv, float* scratch,
                             AttnShape s, float scale, float p, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  if ((int64_t)s.B * s.H == 0) return cudaSuccess;
  const bool half = dt == DType::F16;
#define MINIFT_V3_BWD(TT, DD) \
  launch_bwd<TT, DD>(dout, q, k, v, out, lse, mask, dq, dk, dv, scratch, s, scale, p, seed, offset, stream)
  switch (s.D) {
    case 32: return half ? MINIFT_V3_BWD(__half, 32) : MINIFT_V3_BWD(__nv_bfloat16, 32);
    case 64: return half ? MINIFT_V3_BWD(__half, 64) : MINIFT_V3_BWD(__nv_bfloat16, 64);
    case 128: return half ? MINIFT_V3_BWD(__half, 128) : MINIFT_V3_BWD(__nv_bfloat16, 128);
    default: return cudaErrorInvalidValue;
  }
#undef MINIFT_V3_BWD
}

}  // namespace cuda
}  // namespace minift
