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

// 32 random bits for element n of the stream (seed, offset): element n is lane n % 4 of the block
// counter (n / 4, offset). keep(n) <=> bits >= threshold, threshold = p * 2^32.
MINIFT_HD uint32_t philox_bits(uint64_t seed, uint64_t offset, uint64_t n) {
  uint64_t block = n >> 2;
  Philox4 r = philox4x32_10((uint32_t)block, (uint32_t)(block >> 32), (uint32_t)offset,
                            (uint32_t)(offset >> 32), (uint32_t)seed, (uint32_t)(seed >> 32));
  return r.x[n & 3];
}

MINIFT_HD uint32_t dropout_threshold(float p) {
  double t = (double)p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : (uint32_t)t;
}

}  // namespace minift
