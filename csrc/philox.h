// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a
// counter-based generator. The random bits of element n are a pure function of (seed, n), so the
// attention backward regenerates the forward's dropout mask instead of storing it, and the CPU and
// CUDA kernels draw the same bits for the same seed. No torch header: nvcc compiles this as is.
#pragma once
#include <stdint.h>

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

// keep(n) for the run of elements n0 <= n < n0 + count, handed to visit(j, keep) with j = n - n0:
// one Philox call per four elements (the bits are the ones philox_bits gives). Host code only.
template <typename Visit>
inline void for_each_keep(uint64_t seed, uint64_t offset, uint64_t n0, int64_t count, uint32_t threshold,
                          Visit visit) {
  int64_t j = 0;
  while (j < count) {
    const uint64_t n = n0 + (uint64_t)j;
    const Philox4 r = philox_block(seed, offset, n >> 2);
    for (unsigned lane = (unsigned)(n & 3); lane < 4 && j < count; ++lane, ++j) visit(j, r.x[lane] >= threshold);
  }
}

// mult[j] = keep(n0 + j) ? keep_scale : 0 for j < count: the dropout multipliers of a run of elements.
template <typename T>
inline void dropout_multipliers(T* mult, uint64_t seed, uint64_t offset, uint64_t n0, int64_t count,
                                uint32_t threshold, T keep_scale) {
  for_each_keep(seed, offset, n0, count, threshold, [&](int64_t j, bool keep) { mult[j] = keep ? keep_scale : T(0); });
}

}  // namespace minift
