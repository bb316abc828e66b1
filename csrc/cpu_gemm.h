// Row-major matrix multiply for the CPU kernels: C = alpha op(A) op(B) + beta C.
//
// The attention kernel multiplies many small blocks (a 28 x 28 score block at BERT's usual
// sentence lengths); going through at::mm_out for each costs more in dispatch than the arithmetic.
// So it calls the Fortran BLAS routine sgemm_/dgemm_ directly. PyTorch's x86 builds carry one (MKL)
// and export it; the declarations are weak, so where a build has none the pointer is null and the
// plain loop below runs instead (same result, slower).
//
// Row-major through column-major BLAS: a row-major matrix is its transpose in column-major order,
// so C^T = op(B)^T op(A)^T is one call with the operands swapped.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace minift {

// op(A) is m x k (A stored k x m when transA), op(B) is k x n (B stored n x k when transB), C is
// m x n; lda, ldb, ldc are the row strides of the stored matrices. beta = 0 ignores C's contents.
template <typename T>
inline void gemm_loop(bool transA, bool transB, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda,
                      const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      T acc = 0;
      for (int64_t p = 0; p < k; ++p)
        acc += (transA ? A[p * lda + i] : A[i * lda + p]) * (transB ? B[j * ldb + p] : B[p * ldb + j]);
      C[i * ldc + j] = alpha * acc + (beta == T(0) ? T(0) : beta * C[i * ldc + j]);
    }
}

// MINIFT_NO_BLAS=1 forces the loop (the tests check it against the BLAS path).
inline bool blas_disabled() {
  static const bool disabled = [] {
    const char* flag = std::getenv("MINIFT_NO_BLAS");
    return flag != nullptr && std::strcmp(flag, "1") == 0;
  }();
  return disabled;
}

template <typename T>
inline void gemm(bool transA, bool transB, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda,
                 const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char ta = transB ? 'T' : 'N', tb = transA ? 'T' : 'N';
  const int M = (int)n, N = (int)m, K = (int)k, LDA = (int)ldb, LDB = (int)lda, LDC = (int)ldc;
  if (blas_disabled() || k == 0) return gemm_loop(transA, transB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  if constexpr (sizeof(T) == 4) {
    if (sgemm_ != nullptr) return sgemm_(&ta, &tb, &M, &N, &K, &alpha, B, &LDA, A, &LDB, &beta, C, &LDC);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&ta, &tb, &M, &N, &K, &alpha, B, &LDA, A, &LDB, &beta, C, &LDC);
  }
  gemm_loop(transA, transB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

// Whether gemm reaches a BLAS (for `minift doctor` and the tests of the fallback loop).
inline bool have_blas() { return sgemm_ != nullptr && dgemm_ != nullptr && !blas_disabled(); }

}  // namespace minift
