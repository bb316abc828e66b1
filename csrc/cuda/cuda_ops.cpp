// Torch glue for the CUDA kernels: argument checks, dtype choice, the current stream, and the
// registration of the kernels for the CUDA dispatch key. Compiled only in CUDA builds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "kernels.h"

namespace minift {

static cuda::DType cuda_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::F32;
    case at::kHalf: return cuda::DType::F16;
    case at::kBFloat16: return cuda::DType::BF16;
    default: TORCH_CHECK(false, op, " on CUDA: expected float32, float16 or bfloat16, got ", t.scalar_type(),
                         " (float64 runs on the CPU)");
  }
}

static void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

static cuda::AttnShape shape_of(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.size(3) <= 256, "attention on CUDA: expected head dim D <= 256, got ", q.size(3));
  return cuda::AttnShape{(int)q.size(0), (int)q.size(1), (int)q.size(2), (int)k.size(2), (int)q.size(3)};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& mask, double dropout_p,
                                                      double scale, int64_t seed, int64_t offset) {
  check_attention_inputs(q, k, v, mask, dropout_p, at::kCUDA);
  auto dt = cuda_dtype(q, "attention");
  c10::cuda::CUDAGuard guard(q.device());
  auto out = maybe_poison(at::empty_like(q));
  auto lse = maybe_poison(at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat)));
  check_cuda(cuda::attention_fwd(dt, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                 mask.has_value() ? mask->data_ptr<bool>() : nullptr, out.data_ptr(),
                                 lse.data_ptr<float>(), shape_of(q, k), (float)scale, (float)dropout_p,
                                 (uint64_t)seed, (uint64_t)offset, c10::cuda::getCurrentCUDAStream()),
             "attention forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, double dropout_p, double scale, int64_t seed,
    int64_t offset) {
  check_attention_inputs(q, k, v, mask, dropout_p, at::kCUDA);
  check_like(dout, q, "attention dout", "q", at::kCUDA);
  check_like(out, q, "attention out", "q", at::kCUDA);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 3,
              "attention backward: expected a contiguous float32 lse (B, H, Tq), got ", lse.scalar_type(), " ",
              lse.sizes());
  auto dt = cuda_dtype(q, "attention");
  c10::cuda::CUDAGuard guard(q.device());
  auto dq = maybe_poison(at::empty_like(q)), dk = maybe_poison(at::empty_like(k)),
       dv = maybe_poison(at::empty_like(v));
  const auto shape = shape_of(q, k);
  auto scratch = at::empty({cuda::attention_bwd_scratch(dt, dout.data_ptr(), q.data_ptr(), k.data_ptr(),
                                                        v.data_ptr(), out.data_ptr(), shape)},
                           q.options().dtype(at::kFloat));
  check_cuda(cuda::attention_bwd(dt, dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                 lse.data_ptr<float>(), mask.has_value() ? mask->data_ptr<bool>() : nullptr,
                                 dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), scratch.data_ptr<float>(), shape,
                                 (float)scale, (float)dropout_p,
                                 (uint64_t)seed, (uint64_t)offset, c10::cuda::getCurrentCUDAStream()),
             "attention backward");
  return {dq, dk, dv};
}

at::Tensor dropout_mask_cuda(const at::Tensor& like, int64_t B, int64_t H, int64_t Tq, int64_t Tk, double p,
                             int64_t seed, int64_t offset) {
  TORCH_CHECK(p >= 0 && p < 1, "dropout_mask: expected 0 <= p < 1, got ", p);
  c10::cuda::CUDAGuard guard(like.device());
  auto keep = at::empty({B, H, Tq, Tk}, like.options().dtype(at::kBool));
  check_cuda(cuda::dropout_mask(keep.data_ptr<bool>(), keep.numel(), (float)p, (uint64_t)seed, (uint64_t)offset,
                                c10::cuda::getCurrentCUDAStream()),
             "dropout_mask");
  return keep;
}

// Targets are checked on the GPU, inside the kernel (see xent.cu): a host-side check would wait for
// the GPU on every call.
//
// The op's row statistics are (2, N): the row max m and log s = log sum_c e^{z_c - m}, kept apart
// on the GPU as on the CPU (cross_entropy.cpp, xent.cu).
// The CUDA kernels take no class weights yet: a weighted call stops here with a message.
static void refuse_class_weights(const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(!weight.has_value(), "softmax_cross_entropy on CUDA: per-class weights are not implemented in the "
              "CUDA kernels yet; use F.cross_entropy(weight=...) on the GPU, or run the loss on the CPU");
}

std::tuple<at::Tensor, at::Tensor> xent_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                 const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                 double label_smoothing, int64_t reduction) {
  check_xent_inputs(logits, target, label_smoothing, at::kCUDA);
  refuse_class_weights(weight);
  check_reduction(reduction);
  auto dt = cuda_dtype(logits, "softmax_cross_entropy");
  const int64_t N = logits.size(0), C = logits.size(1);
  c10::cuda::CUDAGuard guard(logits.device());
  auto rows = maybe_poison(at::empty({N}, logits.options().dtype(at::kFloat)));
  auto stats = maybe_poison(at::empty({2, N}, logits.options().dtype(at::kFloat)));
  auto loss = reduction == kReduceNone ? rows : maybe_poison(at::empty({}, logits.options().dtype(at::kFloat)));
  check_cuda(cuda::xent_fwd(dt, logits.data_ptr(), target.data_ptr<int64_t>(), rows.data_ptr<float>(),
                            stats.data_ptr<float>(), reduction == kReduceNone ? nullptr : loss.data_ptr<float>(), N,
                            C, ignore_index, (float)label_smoothing, (int)reduction,
                            c10::cuda::getCurrentCUDAStream()),
             "softmax_cross_entropy forward");
  return {loss, stats};
}

// dz: the tensor to write (a fresh one for xent_bwd; xent_fwd_grad's for xent_bwd_into, kept when grad is 1).
static at::Tensor xent_bwd_cuda_impl(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                     int64_t ignore_index, double label_smoothing, int64_t reduction,
                                     std::optional<at::Tensor> into, bool keep_if_one) {
  check_xent_inputs(logits, target, label_smoothing, at::kCUDA);
  refuse_class_weights(weight);
  check_reduction(reduction);
  check_xent_backward_inputs(grad, stats, logits, at::kFloat, reduction);
  auto dt = cuda_dtype(logits, "softmax_cross_entropy");
  const int64_t N = logits.size(0), C = logits.size(1);
  c10::cuda::CUDAGuard guard(logits.device());
  if (into.has_value()) check_same_layout(*into, logits, "softmax_cross_entropy backward dz", "the logits");
  TORCH_CHECK(!keep_if_one || reduction != kReduceNone, "xent_bwd_into: expected reduction mean or sum, got none");
  auto dz = into.has_value() ? *into : maybe_poison(at::empty_like(logits));
  // the mean's g / count, one float on the GPU; the other reductions read grad directly
  auto mean_scale = reduction == kReduceMean ? at::empty({1}, logits.options().dtype(at::kFloat)) : at::Tensor();
  check_cuda(cuda::xent_bwd(dt, grad.data_ptr<float>(), logits.data_ptr(), target.data_ptr<int64_t>(),
                            stats.data_ptr<float>(), dz.data_ptr(),
                            mean_scale.defined() ? mean_scale.data_ptr<float>() : nullptr,
                            N, C, ignore_index,
                            (float)label_smoothing, (int)reduction, keep_if_one, c10::cuda::getCurrentCUDAStream()),
             "softmax_cross_entropy backward");
  return dz;
}

at::Tensor xent_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                         const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t ignore_index,
                         double label_smoothing, int64_t reduction) {
  return xent_bwd_cuda_impl(grad, logits, target, weight, stats, ignore_index, label_smoothing, reduction,
                            std::nullopt, false);
}

at::Tensor& xent_bwd_into_cuda(at::Tensor& dz, const at::Tensor& grad, const at::Tensor& logits,
                               const at::Tensor& target, const at::Tensor& stats, int64_t ignore_index,
                               double label_smoothing, int64_t reduction) {
  xent_bwd_cuda_impl(grad, logits, target, std::nullopt, stats, ignore_index, label_smoothing, reduction, dz, true);
  return dz;
}

// The one-pass forward: loss, stats and dz for grad = 1. Where the one-pass kernel does not take the
// row (longer than kXentOnePassMaxClasses, or logits and dz aligned differently) the two-pass
// kernels run here instead.
std::tuple<at::Tensor, at::Tensor, at::Tensor> xent_fwd_grad_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                                  int64_t ignore_index, double label_smoothing,
                                                                  int64_t reduction) {
  check_xent_inputs(logits, target, label_smoothing, at::kCUDA);
  check_reduction(reduction);
  TORCH_CHECK(reduction != kReduceNone, "xent_fwd_grad: expected reduction mean or sum, got none");
  auto dt = cuda_dtype(logits, "softmax_cross_entropy");
  const int64_t N = logits.size(0), C = logits.size(1);
  c10::cuda::CUDAGuard guard(logits.device());
  auto dz = maybe_poison(at::empty_like(logits));
  if (!cuda::xent_fwd_grad_supported(logits.data_ptr(), dz.data_ptr(), C)) {   // rows too long, or misaligned:
    auto [loss, stats] = xent_fwd_cuda(logits, target, std::nullopt, ignore_index, label_smoothing, reduction);
    auto one = at::ones({}, logits.options().dtype(at::kFloat));                 // the two passes, both now
    xent_bwd_cuda_impl(one, logits, target, std::nullopt, stats, ignore_index, label_smoothing, reduction, dz, false);
    return {loss, stats, dz};
  }
  auto rows = maybe_poison(at::empty({N}, logits.options().dtype(at::kFloat)));
  auto stats = maybe_poison(at::empty({2, N}, logits.options().dtype(at::kFloat)));
  auto loss = maybe_poison(at::empty({}, logits.options().dtype(at::kFloat)));
  auto w0 = at::empty({1}, logits.options().dtype(at::kFloat));
  check_cuda(cuda::xent_fwd_grad(dt, logits.data_ptr(), target.data_ptr<int64_t>(), rows.data_ptr<float>(),
                                 stats.data_ptr<float>(), loss.data_ptr<float>(), dz.data_ptr(), w0.data_ptr<float>(),
                                 N, C, ignore_index, (float)label_smoothing, (int)reduction,
                                 c10::cuda::getCurrentCUDAStream()),
             "softmax_cross_entropy forward");
  return {loss, stats, dz};
}

std::tuple<at::Tensor, at::Tensor> dropout_fwd_cuda(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(p >= 0 && p < 1, "dropout: expected 0 <= p < 1, got ", p);
  TORCH_CHECK(x.device().is_cuda(), "dropout: expected x on cuda, got ", x.device());
  auto dt = cuda_dtype(x, "dropout");
  TORCH_CHECK(x.is_contiguous(), "dropout: expected a contiguous x (call .contiguous()), got strides ", x.strides());
  c10::cuda::CUDAGuard guard(x.device());
  auto y = maybe_poison(at::empty_like(x));
  auto keep = at::empty_like(x, x.options().dtype(at::kBool));
  check_cuda(cuda::dropout_fwd(dt, x.data_ptr(), y.data_ptr(), keep.data_ptr<bool>(), x.numel(), (float)p,
                               (uint64_t)seed, (uint64_t)offset, c10::cuda::getCurrentCUDAStream()),
             "dropout forward");
  return {y, keep};
}

void adamw_step_cuda(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg, at::Tensor exp_avg_sq, double lr,
                     double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  TORCH_CHECK(param.device().is_cuda(), "adamw_step_: expected CUDA tensors, got ", param.device());
  TORCH_CHECK(param.scalar_type() == at::kFloat, "adamw_step_ on CUDA: expected float32 parameters, got ",
              param.scalar_type());
  TORCH_CHECK(param.is_contiguous(), "adamw_step_: expected a contiguous param, got strides ", param.strides());
  check_same_layout(grad, param, "grad", "param");
  check_same_layout(exp_avg, param, "exp_avg", "param");
  check_same_layout(exp_avg_sq, param, "exp_avg_sq", "param");
  TORCH_CHECK(step >= 1, "adamw_step_: expected step >= 1, got ", step);
  c10::cuda::CUDAGuard guard(param.device());
  check_cuda(cuda::adamw_step(param.data_ptr<float>(), grad.data_ptr<float>(), exp_avg.data_ptr<float>(),
                              exp_avg_sq.data_ptr<float>(), param.numel(), lr, beta1, beta2, eps, weight_decay, step,
                              c10::cuda::getCurrentCUDAStream()),
             "adamw_step_");
}

TORCH_LIBRARY_IMPL(minift, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
  m.impl("xent_fwd", &xent_fwd_cuda);
  m.impl("xent_bwd", &xent_bwd_cuda);
  m.impl("xent_fwd_grad", &xent_fwd_grad_cuda);
  m.impl("xent_bwd_into", &xent_bwd_into_cuda);
  m.impl("dropout_fwd", &dropout_fwd_cuda);
  m.impl("adamw_step_", &adamw_step_cuda);
}

}  // namespace minift
