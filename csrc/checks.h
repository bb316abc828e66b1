// Argument checks shared by the CPU and CUDA glue: each says what was expected and what came.
#pragma once
#include <string>
#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "reduction.h"

namespace minift {

// MINIFT_POISON_OUTPUTS=1: outputs are filled with NaN before a kernel writes them, so that an
// element a kernel forgets shows up in the tests.
inline at::Tensor maybe_poison(at::Tensor t) {
  const char* flag = std::getenv("MINIFT_POISON_OUTPUTS");
  if (flag != nullptr && std::strcmp(flag, "1") == 0) t.fill_(NAN);
  return t;
}

// float16 and bfloat16 inputs are computed in float32 (is_reduced says which; widen converts);
// float32 and float64 as they are.
inline bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}
inline at::Tensor widen(const at::Tensor& t) { return is_reduced(t) ? t.to(at::kFloat) : t; }

// The dtype a fused kernel computes in when its inputs' dtypes differ (autocast hands a bfloat16
// matmul output and float32 parameters to the same op): float64 if any input is float64, else
// float32. as_dtype converts a tensor to it (no copy when it is already there).
inline at::ScalarType compute_dtype(std::initializer_list<const at::Tensor*> ts) {
  for (auto* t : ts)
    if (t->scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}
inline at::Tensor as_dtype(const at::Tensor& t, at::ScalarType st) {
  return t.scalar_type() == st ? t : t.to(st);
}

inline void check_floating(const at::Tensor& t, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
              ": expected float32, float64, float16 or bfloat16, got ", st);
}

// a has ref's device, dtype and shape
inline void check_same_kind(const at::Tensor& a, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(a.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " like ", ref_name,
              ", got ", a.device());
  TORCH_CHECK(a.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " like ",
              ref_name, ", got ", a.scalar_type());
  TORCH_CHECK(a.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " like ", ref_name, ", got ",
              a.sizes());
}

inline void check_same_layout(const at::Tensor& a, const at::Tensor& ref, const char* name, const char* ref_name) {
  check_same_kind(a, ref, name, ref_name);
  TORCH_CHECK(a.is_contiguous(), name, ": expected a contiguous tensor (call .contiguous()), got strides ",
              a.strides());
}

// The CPU attention kernels read and write (B, H, T, D) tensors (packed: (N, H, D)) at any strides
// whose rows of D numbers are contiguous (the projections' output viewed per head); the CUDA ones
// want them contiguous.
inline bool attention_layout_ok(const at::Tensor& t, at::DeviceType device) {
  return device == at::kCPU ? (t.size(-1) == 1 || t.stride(-1) == 1) : t.is_contiguous();
}

inline void check_attention_layout(const at::Tensor& t, const char* name, at::DeviceType device) {
  TORCH_CHECK(attention_layout_ok(t, device), name,
              device == at::kCPU ? ": expected rows of D contiguous (last stride 1; call .contiguous()), got strides "
                                 : ": expected a contiguous tensor (call .contiguous()), got strides ",
              t.strides());
}

// v (like k), dout and out (like q): the shape, dtype and device of ref, in a layout the kernels read
inline void check_like(const at::Tensor& a, const at::Tensor& ref, const char* name, const char* ref_name,
                       at::DeviceType device) {
  check_same_kind(a, ref, name, ref_name);
  check_attention_layout(a, name, device);
}

inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& mask, double dropout_p, at::DeviceType device) {
  // first: inputs on different devices (the dispatcher then picks the kernel of the GPU one)
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device() && (!mask.has_value() || mask->device() == q.device()),
              "attention: expected q, k, v", mask.has_value() ? " and key_padding_mask" : "", " on one device, got q on ",
              q.device(), ", k on ", k.device(), ", v on ", v.device(),
              mask.has_value() ? ", key_padding_mask on " + mask->device().str() : std::string());
  TORCH_CHECK(q.device().type() == device, "attention: expected q on ", device, ", got ", q.device());
  TORCH_CHECK(q.dim() == 4, "attention: expected q of shape (B, H, T, D), got ", q.dim(), " dims ", q.sizes());
  check_floating(q, "attention q");
  TORCH_CHECK(q.numel() > 0, "attention: expected non-empty q, got shape ", q.sizes());
  check_attention_layout(q, "attention q", device);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "attention: expected k of shape (", q.size(0), ", ", q.size(1), ", Tk, ", q.size(3), "), got ",
              k.sizes());
  TORCH_CHECK(k.size(2) > 0, "attention: expected at least one key, got shape ", k.sizes());
  check_like(v, k, "attention v", "k", device);
  TORCH_CHECK(k.device() == q.device(), "attention k: expected a tensor on ", q.device(), " like q, got ",
              k.device());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "attention k: expected dtype ", q.scalar_type(),
              " like q, got ", k.scalar_type());
  check_attention_layout(k, "attention k", device);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention: expected 0 <= dropout_p < 1, got ", dropout_p);
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "attention: expected a bool key_padding_mask, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == k.size(2),
                "attention: expected key_padding_mask of shape (", q.size(0), ", ", k.size(2), "), got ", m.sizes());
    TORCH_CHECK(m.device() == q.device(), "attention: expected key_padding_mask on ", q.device(), ", got ",
                m.device());
    TORCH_CHECK(m.is_contiguous(), "attention: expected a contiguous key_padding_mask");
  }
}

inline void check_xent_inputs(const at::Tensor& logits, const at::Tensor& target, double label_smoothing,
                              at::DeviceType device) {
  TORCH_CHECK(target.device() == logits.device(), "softmax_cross_entropy: expected logits and target on one device, got "
              "logits on ", logits.device(), ", target on ", target.device());
  TORCH_CHECK(logits.device().type() == device, "softmax_cross_entropy: expected logits on ", device, ", got ",
              logits.device());
  TORCH_CHECK(logits.dim() == 2, "softmax_cross_entropy: expected logits of shape (N, C), got ", logits.sizes());
  check_floating(logits, "softmax_cross_entropy logits");
  TORCH_CHECK(logits.size(0) > 0 && logits.size(1) > 0, "softmax_cross_entropy: expected non-empty logits, got ",
              logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), "softmax_cross_entropy: expected contiguous logits, got strides ",
              logits.strides());
  TORCH_CHECK(target.scalar_type() == at::kLong, "softmax_cross_entropy: expected int64 targets, got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "softmax_cross_entropy: expected target of shape (",
              logits.size(0), "), got ", target.sizes());
  TORCH_CHECK(target.device() == logits.device(), "softmax_cross_entropy: expected target on ", logits.device(),
              ", got ", target.device());
  TORCH_CHECK(target.is_contiguous(), "softmax_cross_entropy: expected a contiguous target");
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "softmax_cross_entropy: expected 0 <= label_smoothing <= 1, got ", label_smoothing);
}

// The optional per-class weights of the cross-entropy: (C,), the logits' dtype and device, as
// F.cross_entropy(weight=...) takes them (the CPU kernel checks their values). ValueError and
// TypeError in Python, as minift.functional.check_class_weight raises them.
inline void check_xent_weight(const std::optional<at::Tensor>& weight, const at::Tensor& logits) {
  if (!weight.has_value()) return;
  const auto& w = *weight;
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == logits.size(1),
                    "softmax_cross_entropy: expected weight of shape (C,) = (", logits.size(1),
                    ",), one per class, got ", w.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == logits.scalar_type(), "softmax_cross_entropy: expected weight of dtype ",
                   logits.scalar_type(), " like the logits, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.device() == logits.device(), "softmax_cross_entropy: expected weight on ", logits.device(),
                    " like the logits, got ", w.device());
}

// The reduction argument of xent_fwd/xent_bwd (reduction.h), with at::Reduction's numbering.
static_assert(kReduceNone == at::Reduction::None && kReduceMean == at::Reduction::Mean &&
                  kReduceSum == at::Reduction::Sum,
              "reduction.h must number the reductions as at::Reduction does");

inline void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= kReduceNone && reduction <= kReduceSum,
              "softmax_cross_entropy: expected reduction 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// The backward's grad: (N,) for reduction none, () for mean and sum; grad and the row statistics
// (2, N) (the forward's second output) in the loss's dtype acc.
inline void check_xent_backward_inputs(const at::Tensor& grad, const at::Tensor& stats, const at::Tensor& logits,
                                       at::ScalarType acc, int64_t reduction) {
  const int64_t N = logits.size(0);
  const bool per_row = reduction == kReduceNone;
  TORCH_CHECK((per_row ? grad.dim() == 1 && grad.size(0) == N : grad.dim() == 0) && grad.scalar_type() == acc &&
                  grad.is_contiguous() && grad.device() == logits.device(),
              "softmax_cross_entropy backward: expected a contiguous ", acc, " grad of shape ",
              per_row ? "(" + std::to_string(N) + ",)" : std::string("() for reduction mean/sum"), " on ",
              logits.device(), ", got ", grad.sizes(), " ", grad.scalar_type(), " on ", grad.device());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == N && stats.scalar_type() == acc &&
                  stats.is_contiguous() && stats.device() == logits.device(),
              "softmax_cross_entropy backward: expected the forward's contiguous ", acc,
              " row statistics of shape (2, ", N, "), got ", stats.sizes(), " ", stats.scalar_type());
}

}  // namespace minift
