// The launchers of attention_v1.cu, attention_v3.cu, attention_rows.cu, xent.cu and elementwise.cu: raw pointers,
// sizes and a stream, no torch types.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include <initializer_list>

#include "../reduction.h"

namespace minift {
namespace cuda {

enum class DType { F32, F16, BF16 };

struct AttnShape {
  int B, H, Tq, Tk, D;
};

// q (B,H,Tq,D), k/v (B,H,Tk,D), mask (B,Tk) or null -> out (B,H,Tq,D), lse (B,H,Tq) float.
cudaError_t attention_fwd(DType dt, const void* q, const void* k, const void* v, const bool* mask, void* out,
                          float* lse, AttnShape s, float scale, float p, uint64_t seed, uint64_t offset,
                          cudaStream_t stream);
// attention_v3.cu: version 3 on tensor cores (float16/bfloat16, D in 32/64/128, sm_80+), which
// attention_fwd/attention_bwd pick when attention_tc_supported says so and the 16-bit inputs start
// on 16-byte boundaries.
bool attention_tc_supported(DType dt, int D);
cudaError_t attention_fwd_tc(DType dt, const void* q, const void* k, const void* v, const bool* mask, void* out,
                             float* lse, AttnShape s, float scale, float p, uint64_t seed, uint64_t offset,
                             cudaStream_t stream);
int64_t attention_bwd_tc_scratch(AttnShape s);
cudaError_t attention_bwd_tc(DType dt, const void* dout, const void* q, const void* k, const void* v, const void* out,
                             const float* lse, const bool* mask, void* dq, void* dk, void* dv, float* scratch,
                             AttnShape s, float scale, float p, uint64_t seed, uint64_t offset, cudaStream_t stream);
// attention_rows.cu: float32 with D in 32/64/128 on CUDA cores, when every pointer is 16-byte aligned.
bool attention_rows_supported(DType dt, int D, std::initializer_list<const void*> pointers);
cudaError_t attention_fwd_rows(const void* q, const void* k, const void* v, const bool* mask, void* out, float* lse,
                               AttnShape s, float scale, float p, uint64_t seed, uint64_t offset, cudaStream_t stream);
int64_t attention_bwd_rows_scratch(AttnShape s);
cudaError_t attention_bwd_rows(const void* dout, const void* q, const void* k, const void* v, const void* out,
                               const float* lse, const bool* mask, void* dq, void* dk, void* dv, float* scratch,
                               AttnShape s, float scale, float p, uint64_t seed, uint64_t offset, cudaStream_t stream);
// The float scratch attention_bwd needs, in elements, for these inputs (dQ, dK and dV are fresh
// allocations: aligned).
int64_t attention_bwd_scratch(DType dt, const void* dout, const void* q, const void* k, const void* v,
                              const void* out, AttnShape s);
cudaError_t attention_bwd(DType dt, const void* dout, const void* q, const void* k, const void* v, const void* out,
                          const float* lse, const bool* mask, void* dq, void* dk, void* dv, float* scratch,
                          AttnShape s, float scale, float p, uint64_t seed, uint64_t offset, cudaStream_t stream);
cudaError_t dropout_mask(bool* keep, int64_t n, float p, uint64_t seed, uint64_t offset, cudaStream_t stream);
// elementwise.cu: y = x keep / (1 - p) and keep for n elements; AdamW's update of n float32 values.
cudaError_t dropout_fwd(DType dt, const void* x, void* y, bool* keep, int64_t n, float p, uint64_t seed,
                        uint64_t offset, cudaStream_t stream);
cudaError_t adamw_step(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1, double beta2,
                       double eps, double weight_decay, int64_t step, cudaStream_t stream);
// The reduction argument of the cross-entropy: kReduceNone, kReduceMean, kReduceSum (../reduction.h).

// z (N, C) -> rows (N,) per-row losses and stats (2, N): the row max m, then log sum_c e^{z_c - m};
// for mean/sum also loss[0] (rows is then scratch).
cudaError_t xent_fwd(DType dt, const void* z, const int64_t* target, float* rows, float* stats, float* loss, int64_t N,
                     int64_t C, int64_t ignore_index, float eps, int reduction, cudaStream_t stream);
// grad (N,) for none, (1,) otherwise -> dz (N, C); weight: one float of scratch for the mean (else null).
// keep_if_one: dz already holds the gradient for g = 1 (xent_fwd_grad wrote it), and the kernel
// leaves it as it is when grad[0] is exactly 1 (checked on the GPU), else overwrites it.
cudaError_t xent_bwd(DType dt, const float* grad, const void* z, const int64_t* target, const float* stats, void* dz,
                     float* weight, int64_t N, int64_t C, int64_t ignore_index, float eps, int reduction,
                     bool keep_if_one, cudaStream_t stream);
// The one-pass forward (mean and sum): the loss as xent_fwd, and dz (N, C) for an incoming gradient
// of 1; w0: one float of scratch. Where xent_fwd_grad_supported is false, cudaErrorInvalidValue.
bool xent_fwd_grad_supported(const void* z, const void* dz, int64_t C);
cudaError_t xent_fwd_grad(DType dt, const void* z, const int64_t* target, float* rows, float* stats, float* loss,
                          void* dz, float* w0, int64_t N, int64_t C, int64_t ignore_index, float eps, int reduction,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace minift
