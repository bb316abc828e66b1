// minift's own float32 matrix multiply for the CPU: C = op(A) op(B) (+ bias) (+ C), row-major.
//
// Why: PyTorch's CPU build sends float32 matmuls to MKL. On some x86 CPUs (AMD's, measured in
// benchmarks/RESULTS.md) MKL runs its AVX2 code although the CPU has AVX-512, and reaches under half
// of what the CPU's FMA units can do; a fine-tuning step is mostly these matmuls. The method here is
// the one BLIS and every tuned BLAS use (Goto and van de Geijn, "Anatomy of high-performance matrix
// multiplication", 2008):
//
//   for each block of kc columns of op(A) (rows of op(B)):          C += A[:, p:p+kc] B[p:p+kc, :]
//     pack op(B)'s kc x n block into panels of NR columns, each panel kc x NR contiguous (it is
//       read from the L1 cache MR rows of C at a time);
//     for each block of mc rows of op(A):
//       pack it into panels of MR rows, each kc x MR contiguous (the block stays in L2);
//       for each panel of B, for each panel of A: the micro-kernel, an MR x NR tile of C held in
//         registers: for p < kc, tile += A[:, p] (MR numbers) outer B[p, :] (NR numbers).
//
// The micro-kernel is the only place with arithmetic: per p it loads NR/W vectors of B, broadcasts
// MR numbers of A and issues MR * NR / W fused multiply-adds into MR * NR / W accumulator registers
// (W floats per vector). AVX-512 (32 registers): MR = 14, NR = 32, 28 accumulators; AVX2 (16
// registers): MR = 6, NR = 16, 12 accumulators. Each p costs 2 + MR loads for 2 MR FMAs, so the FMA
// units, not the loads, set the pace. Packing makes both operands' transposes the same case (the
// micro-kernel never sees a stride) and pads the edges with zeros, so ragged shapes run the same
// kernel and only the write back of a partial tile is special.
//
// Accuracy: each element is a sum over k of products, each product fused into the running sum (one
// rounding per term, as MKL's FMA kernels do); blocks of kc are summed in registers and added to C
// one block after another. Against a float64 product the error is that of any blocked float32 dot
// product, and tests/test_gemm.py holds it to 2x torch.mm's.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define MINIFT_OWN_SGEMM 1
#else
#define MINIFT_OWN_SGEMM 0
#endif

namespace minift {
namespace sgemm {

#if MINIFT_OWN_SGEMM
#if defined(__AVX512F__)
using V = __m512;
constexpr int W = 16, MR = 14, NV = 2;
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vset1(float x) { return _mm512_set1_ps(x); }
inline V vzero() { return _mm512_setzero_ps(); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
constexpr const char* kIsa = "AVX-512, 14 x 32 tile";
#else
using V = __m256;
constexpr int W = 8, MR = 6, NV = 2;
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vset1(float x) { return _mm256_set1_ps(x); }
inline V vzero() { return _mm256_setzero_ps(); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
constexpr const char* kIsa = "AVX2, 6 x 16 tile";
#endif
constexpr int NR = W * NV;
constexpr int64_t KC_MAX = 256;    // B's kc x NR panel: 32 KB under AVX-512, in a 48 KB L1
constexpr int64_t MC = MR * 8;     // A's mc x kc block: 112 x 256 x 4 B = 112 KB, in L2

// tile = bias[j] (if bias) + a (kc x MR, packed) times b (kc x NR, packed); then C[0:mr, 0:nr] = tile
// (+ C if add).
//
// The sums run in two levels: KS products at a time into registers that start from zero, each such
// partial sum then added to the tile kept in L1 (it starts from the bias). A float32 sum of k terms
// one after another gathers rounding error that grows with k (about sqrt(k) eps for random signs);
// in two levels it grows with KS + k / KS, several times less at k = 1536, for an extra load, add
// and store per accumulator every KS steps (an add unit the FMAs do not use: a few percent).
constexpr int64_t KS = 64;
inline void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b, float* c, int64_t ldc,
                         bool add, const float* bias, int mr, int nr) {
  alignas(64) float tile[MR * NR];
  alignas(64) float bias_row[NR] = {};
  if (bias)
    for (int j = 0; j < nr; ++j) bias_row[j] = bias[j];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) vstore(tile + i * NR + v * W, vload(bias_row + v * W));
  for (int64_t p0 = 0; p0 < kc; p0 += KS) {
    const int64_t steps = std::min(KS, kc - p0);
    V acc[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = vzero();
    for (int64_t p = 0; p < steps; ++p) {
      V bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = vload(b + v * W);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const V ai = vset1(a[i]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = vfma(ai, bv[v], acc[i][v]);
      }
      a += MR;
      b += NR;
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) vstore(tile + i * NR + v * W, vadd(vload(tile + i * NR + v * W), acc[i][v]));
  }
  if (mr == MR && nr == NR) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        float* cp = c + i * ldc + v * W;
        const V r = vload(tile + i * NR + v * W);
        vstore(cp, add ? vadd(r, vload(cp)) : r);
      }
    return;
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) {
      const float r = tile[i * NR + j];
      c[i * ldc + j] = add ? c[i * ldc + j] + r : r;
    }
}

// Rows [i0, i0 + mc) and columns [p0, p0 + kc) of op(A) into panels of MR rows: out[panel][p][i],
// rows past mc zero. op(A)(i, p) = A[i * lda + p], or A[p * lda + i] when transA.
inline void pack_a(bool transA, const float* A, int64_t lda, int64_t i0, int64_t mc, int64_t p0, int64_t kc,
                   float* out) {
  for (int64_t ir = 0; ir < mc; ir += MR) {
    const int rows = (int)std::min<int64_t>(MR, mc - ir);
    if (transA) {
      for (int64_t p = 0; p < kc; ++p) {
        const float* src = A + (p0 + p) * lda + i0 + ir;
        float* dst = out + p * MR;
        int i = 0;
        for (; i < rows; ++i) dst[i] = src[i];
        for (; i < MR; ++i) dst[i] = 0.f;
      }
    } else {
      const float* rowp[MR];
      for (int i = 0; i < MR; ++i) rowp[i] = i < rows ? A + (i0 + ir + i) * lda + p0 : nullptr;
      for (int64_t p = 0; p < kc; ++p)
        for (int i = 0; i < MR; ++i) out[p * MR + i] = i < rows ? rowp[i][p] : 0.f;
    }
    out += kc * MR;
  }
}

// Rows [p0, p0 + kc) of op(B), all n columns, into panels of NR columns: out[panel][p][j], columns
// past n zero. op(B)(p, j) = B[p * ldb + j], or B[j * ldb + p] when transB. Panels [jp0, jp1) only
// (the threads split them).
inline void pack_b(bool transB, const float* B, int64_t ldb, int64_t n, int64_t p0, int64_t kc, int64_t jp0,
                   int64_t jp1, float* out) {
  for (int64_t jp = jp0; jp < jp1; ++jp) {
    const int64_t j0 = jp * NR;
    const int cols = (int)std::min<int64_t>(NR, n - j0);
    float* dst = out + jp * kc * NR;
    if (!transB) {
      for (int64_t p = 0; p < kc; ++p) {
        const float* src = B + (p0 + p) * ldb + j0;
        if (cols == NR) {
          std::memcpy(dst + p * NR, src, sizeof(float) * NR);
        } else {
          int j = 0;
          for (; j < cols; ++j) dst[p * NR + j] = src[j];
          for (; j < NR; ++j) dst[p * NR + j] = 0.f;
        }
      }
    } else {
      // column j of the panel is row j0 + j of B: read it along, write it down the panel
      for (int j = 0; j < NR; ++j) {
        if (j < cols) {
          const float* src = B + (j0 + j) * ldb + p0;
          for (int64_t p = 0; p < kc; ++p) dst[p * NR + j] = src[p];
        } else {
          for (int64_t p = 0; p < kc; ++p) dst[p * NR + j] = 0.f;
        }
      }
    }
  }
}

// C (m x n, row stride ldc) = op(A) op(B) (+ bias[j]). op(A) is m x k (A
// stored k x m when transA), op(B) is k x n (B stored n x k when transB). parallel_for(begin, end,
// f) runs f(b, e) over [begin, end) split across `threads` threads (at::parallel_for in the extension).
template <typename ParallelFor>
void gemm(bool transA, bool transB, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, const float* bias, int64_t threads, ParallelFor&& parallel_for) {
  if (m == 0 || n == 0) return;
  if (k == 0) {                       // an empty sum: C = bias, or 0
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = bias ? bias[j] : 0.f;
    return;
  }
  const int64_t kblocks = (k + KC_MAX - 1) / KC_MAX;
  const int64_t kc_max = ((k + kblocks - 1) / kblocks + 7) / 8 * 8;      // equal blocks, a multiple of 8
  const int64_t panels = (n + NR - 1) / NR;
  // blocks of at most MC rows, as many as a multiple of the threads (each thread the same share:
  // 384 rows on 2 threads are 4 blocks of 98, 98, 98, 90 rather than 112, 112, 112, 48)
  threads = std::max<int64_t>(threads, 1);
  const int64_t mblocks = ((m + MC - 1) / MC + threads - 1) / threads * threads;
  const int64_t mc_max = ((m + mblocks - 1) / mblocks + MR - 1) / MR * MR;
  std::unique_ptr<float[]> bpack(new float[panels * NR * kc_max]);
  for (int64_t p0 = 0; p0 < k; p0 += kc_max) {
    const int64_t kc = std::min(kc_max, k - p0);
    parallel_for(0, panels, [&](int64_t b0, int64_t b1) { pack_b(transB, B, ldb, n, p0, kc, b0, b1, bpack.get()); });
    const bool add = p0 > 0;                 // later blocks of k add to what the first wrote
    const float* bias_here = p0 == 0 ? bias : nullptr;
    parallel_for(0, mblocks, [&](int64_t blk0, int64_t blk1) {
      std::vector<float> apack(mc_max * kc);
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t i0 = blk * mc_max, mc = std::min(mc_max, m - i0);
        if (mc <= 0) break;
        pack_a(transA, A, lda, i0, mc, p0, kc, apack.data());
        for (int64_t jp = 0; jp < panels; ++jp) {
          const int64_t j0 = jp * NR;
          const int nr = (int)std::min<int64_t>(NR, n - j0);
          const float* bp = bpack.get() + jp * kc * NR;
          for (int64_t ir = 0; ir < mc; ir += MR)
            micro_kernel(kc, apack.data() + ir * kc, bp, C + (i0 + ir) * ldc + j0, ldc, add,
                         bias_here ? bias_here + j0 : nullptr, (int)std::min<int64_t>(MR, mc - ir), nr);
        }
      }
    });
  }
}
#endif  // MINIFT_OWN_SGEMM

}  // namespace sgemm
}  // namespace minift
