// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a
// counter-based generator. The random bits of element n are a pure function of (seed, n), so the
// attention backward regenerates the forward's dropout mask instead of storing it, and the CPU and
// CUDA kernels draw the same bits for the same seed. No torch header: nvcc compiles this as is.
#pragma once
#include <stdint.h>

#if !defined(__CUDACC__)
#include <algorithm>
#include <cstring>
#endif

#if defined(__CUDACC__)
#define MINIFT_HD __host__ __device__ __forceinline__
#else
#define MINIFT_HD inline
#endif

namespace minift {

struct Philox4 {
  uint32_t x[4];
};

MINIFT_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t product = (uint64_t)a * (uint64_t)b;
  *hi = (uint32_t)(product >> 32);
  return (uint32_t)product;
}

// Ten rounds of the Philox bijection on the counter, the key bumped by the Weyl constants.
MINIFT_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo32(M0, c0, &hi0);
    uint32_t lo1 = mulhilo32(M1, c2, &hi1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += W0; k1 += W1;
  }
  Philox4 r;
  r.x[0] = c0; r.x[1] = c1; r.x[2] = c2; r.x[3] = c3;
  return r;
}

// The four 32-bit words of block `block` of the stream (seed, offset): counter (block, offset), key seed.
MINIFT_HD Philox4 philox_block(uint64_t seed, uint64_t offset, uint64_t block) {
  return philox4x32_10((uint32_t)block, (uint32_t)(block >> 32), (uint32_t)offset, (uint32_t)(offset >> 32),
                       (uint32_t)seed, (uint32_t)(seed >> 32));
}

// 32 random bits for element n of the stream (seed, offset): element n is lane n % 4 of the block
// counter (n / 4, offset). keep(n) <=> bits >= threshold, threshold = p * 2^32.
MINIFT_HD uint32_t philox_bits(uint64_t seed, uint64_t offset, uint64_t n) {
  return philox_block(seed, offset, n >> 2).x[n & 3];
}

MINIFT_HD uint32_t dropout_threshold(float p) {
  double t = (double)p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : (uint32_t)t;
}

#if !defined(__CUDACC__)
// Host code: sixteen blocks at a time in vector registers. The GCC/Clang vector extension below is
// lowered to what the build targets (AVX-512: one register per vector; AVX2 or SSE2: two or four),
// with the widening 32 x 32 -> 64-bit multiply (vpmuludq) on even and odd lanes for mulhilo32. The
// numbers are philox_block's, bit for bit; one call costs about what two or three single blocks do.
#if defined(__GNUC__) || defined(__clang__)
#define MINIFT_PHILOX_VECTORS 1
typedef uint32_t PhiloxU32x16 __attribute__((vector_size(64)));
typedef uint64_t PhiloxU64x8 __attribute__((vector_size(64)));

inline void mulhilo32x16(const PhiloxU32x16& a, uint32_t m, PhiloxU32x16& lo, PhiloxU32x16& hi) {
  const PhiloxU64x8 low32 = PhiloxU64x8{} + 0xFFFFFFFFull, a64 = (PhiloxU64x8)a;
  const PhiloxU64x8 even = (a64 & low32) * (uint64_t)m, odd = (a64 >> 32) * (uint64_t)m;   // lanes 2i, 2i + 1
  lo = (PhiloxU32x16)((even & low32) | (odd << 32));
  hi = (PhiloxU32x16)((even >> 32) | (odd & ~low32));
}

#if defined(__clang__)
#define MINIFT_SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define MINIFT_SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, decltype(a){__VA_ARGS__})
#endif

// The 64 numbers of blocks block0 .. block0 + 15 of the stream (seed, offset), in element order:
// out[4 i + k] = word k of block block0 + i.
inline void philox_16_blocks(uint64_t seed, uint64_t offset, uint64_t block0, uint32_t* out) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  const PhiloxU32x16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const uint32_t b_lo = (uint32_t)block0, b_hi = (uint32_t)(block0 >> 32);
  PhiloxU32x16 c0 = b_lo + iota;                                       // the counter block0 + i, in two words:
  PhiloxU32x16 c1 = b_hi - (PhiloxU32x16)(c0 < b_lo);                  // a carry (the compare gives ~0) adds 1
  PhiloxU32x16 c2 = PhiloxU32x16{} + (uint32_t)offset, c3 = PhiloxU32x16{} + (uint32_t)(offset >> 32);
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    PhiloxU32x16 lo0, hi0, lo1, hi1;
    mulhilo32x16(c0, M0, lo0, hi0);
    mulhilo32x16(c2, M1, lo1, hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  // Four words per block into element order: pairs (c0[i], c1[i]) and (c2[i], c3[i]) as 64-bit lanes,
  // then those interleaved: each 16-number vector holds four whole blocks.
  const PhiloxU32x16 w01_lo = MINIFT_SHUFFLE2(c0, c1, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const PhiloxU32x16 w01_hi = MINIFT_SHUFFLE2(c0, c1, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const PhiloxU32x16 w23_lo = MINIFT_SHUFFLE2(c2, c3, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const PhiloxU32x16 w23_hi = MINIFT_SHUFFLE2(c2, c3, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const PhiloxU64x8 a = (PhiloxU64x8)w01_lo, b = (PhiloxU64x8)w23_lo, c = (PhiloxU64x8)w01_hi, d = (PhiloxU64x8)w23_hi;
  const PhiloxU64x8 blocks[4] = {MINIFT_SHUFFLE2(a, b, 0, 8, 1, 9, 2, 10, 3, 11), MINIFT_SHUFFLE2(a, b, 4, 12, 5, 13, 6, 14, 7, 15),
                                 MINIFT_SHUFFLE2(c, d, 0, 8, 1, 9, 2, 10, 3, 11), MINIFT_SHUFFLE2(c, d, 4, 12, 5, 13, 6, 14, 7, 15)};
  std::memcpy(out, blocks, sizeof(blocks));
}
#undef MINIFT_SHUFFLE2
#endif  // GCC or Clang: vector extensions

// bits[j] = philox_bits(seed, offset, n0 + j) for 0 <= j < count: sixteen blocks a call, a single
// block where at most two are left.
inline void philox_bits_run(uint64_t seed, uint64_t offset, uint64_t n0, int64_t count, uint32_t* bits) {
  uint64_t block = n0 >> 2;
  int64_t lane = (int64_t)(n0 & 3), j = 0;
  while (j < count) {
    const int64_t want = count - j;
#if defined(MINIFT_PHILOX_VECTORS)
    const bool one_at_a_time = lane + want <= 8;                       // one or two blocks
#else
    const bool one_at_a_time = true;                                   // no vector extensions (MSVC)
#endif
    if (one_at_a_time) {
      const Philox4 r = philox_block(seed, offset, block);
      for (; lane < 4 && j < count; ++lane, ++j) bits[j] = r.x[lane];
    } else {
#if defined(MINIFT_PHILOX_VECTORS)
      uint32_t buf[64];
      philox_16_blocks(seed, offset, block, buf);
      const int64_t take = std::min<int64_t>(64 - lane, want);
      std::memcpy(bits + j, buf + lane, (size_t)take * sizeof(uint32_t));
      j += take;
      block += 15;
#endif
    }
    ++block;
    lane = 0;
  }
}

// keep(n) for the run of elements n0 <= n < n0 + count, handed to visit(j, keep) with j = n - n0:
// the bits drawn 256 at a time by philox_bits_run (the ones philox_bits gives).
template <typename Visit>
inline void for_each_keep(uint64_t seed, uint64_t offset, uint64_t n0, int64_t count, uint32_t threshold,
                          Visit visit) {
  constexpr int64_t kChunk = 256;
  uint32_t bits[kChunk];
  for (int64_t j0 = 0; j0 < count;) {
    const int64_t m = std::min<int64_t>(kChunk - (int64_t)((n0 + j0) & 3), count - j0);   // chunks start on a block
    philox_bits_run(seed, offset, n0 + j0, m, bits);
    for (int64_t j = 0; j < m; ++j) visit(j0 + j, bits[j] >= threshold);
    j0 += m;
  }
}

// mult[j] = keep(n0 + j) ? keep_scale : 0 for j < count: the dropout multipliers of a run of elements.
template <typename T>
inline void dropout_multipliers(T* mult, uint64_t seed, uint64_t offset, uint64_t n0, int64_t count,
                                uint32_t threshold, T keep_scale) {
  for_each_keep(seed, offset, n0, count, threshold, [&](int64_t j, bool keep) { mult[j] = keep ? keep_scale : T(0); });
}
#endif  // !__CUDACC__

}  // namespace minift
