// Autograd for the minift ops: which backward op each forward op's gradient comes from.
//
// Each forward op (attention_fwd, xent_fwd, dropout_fwd, add_layer_norm_fwd, bias_gelu_fwd, linear_fwd) gets a kernel for the Autograd dispatch
// key. When an input needs a gradient, the kernel records a node in the autograd graph and calls the
// op again below autograd, where the CPU or CUDA kernel runs; the node's backward calls the matching
// backward op (attention_bwd, xent_bwd, native_dropout_backward) on what the forward saved. The math
// of each backward is derived next to its kernels (attention.cpp, cross_entropy.cpp, layer_norm.cpp, gelu.cpp).
//
// This wiring could be written in Python with torch.library.register_autograd, and it was, until
// measurement showed the price: that Python layer runs on every call, gradient or not, and cost about
// 65 us per call on the CPU here, more than both cross-entropy kernels take for N = 4096, C = 2.
// In C++ it costs a few microseconds. The fake (meta) kernels for torch.compile stay in
// minift/ops.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "checks.h"
#include "reduction.h"

namespace minift {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The op as registered in TORCH_LIBRARY(minift), looked up once.
template <typename Sig>
static c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using AttnFwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const std::optional<at::Tensor>&, double, double, int64_t,
                                                      int64_t);
using AttnBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, double, double, int64_t, int64_t);
using XentFwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      const std::optional<at::Tensor>&, int64_t, double, int64_t);
using XentBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, const at::Tensor&, int64_t, double, int64_t);
using XentFwdGradSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                                      double, int64_t);
using XentBwdIntoSig = at::Tensor&(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, int64_t, double, int64_t);
using DropoutFwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, int64_t, int64_t);
using AddLnFwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, int64_t, int64_t);
using AddLnBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    double);
using BiasGeluFwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&);
using BiasGeluBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&);
using LinearFwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);
using GemmSig = at::Tensor(const at::Tensor&, const at::Tensor&, bool, bool, const std::optional<at::Tensor>&);

// O = softmax(Q K^T * scale + mask) V. Saves Q, K, V, O and the row log-sum-exp; the backward
// recomputes the probabilities from them (and the dropout mask from seed and offset).
struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, double p, double scale, int64_t seed,
                               int64_t offset) {
    static auto fwd = op<AttnFwdSig>("minift::attention_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);   // no zero tensors for the outputs nobody differentiates
    auto [out, lse] = fwd.call(q, k, v, mask, p, scale, seed, offset);
    ctx->save_for_backward({q, k, v, out, lse, mask.has_value() ? *mask : at::Tensor()});
    ctx->saved_data["p"] = p;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(8);                 // O unused: no gradient
    static auto bwd = op<AttnBwdSig>("minift::attention_bwd");
    auto s = ctx->get_saved_variables();
    std::optional<at::Tensor> mask;
    if (s[5].defined()) mask = s[5];
    // dO as it comes where the kernel reads it (on the CPU: the output projection's gradient, (B, T, H*D)
    // viewed per head, the layout O was written in), else a contiguous copy
    const at::Tensor& g = grads[0];
    auto [dq, dk, dv] = bwd.call(attention_layout_ok(g, g.device().type()) ? g : g.contiguous(), s[0], s[1], s[2], s[3], s[4], mask,
                                 ctx->saved_data["p"].toDouble(), ctx->saved_data["scale"].toDouble(),
                                 ctx->saved_data["seed"].toInt(), ctx->saved_data["offset"].toInt());
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The cross-entropy loss (per row, summed or averaged), with optional class weights. Saves the
// logits, the targets, the weights and the row statistics (2, N): the row max and
// log sum_c e^{z_c - max}, kept apart (their sum, the log-sum-exp, would round the second away at
// large logits); the backward is softmax minus the smoothed one-hot, weighted, times the output
// gradient. The class weights get no gradient (F.cross_entropy refuses one that asks for it).
struct XentFunction : public torch::autograd::Function<XentFunction> {
  // one_pass (CUDA, mean, no class weights, a gradient wanted): xent_fwd_grad writes dlogits for
  // grad = 1 in the forward's pass over the logits; the backward hands that tensor out once (as it is
  // when grad is 1, recomputed from the logits otherwise). A second backward (retain_graph) computes
  // afresh with xent_bwd.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, int64_t ignore_index,
                               double label_smoothing, int64_t reduction, bool one_pass) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);   // no zero tensors for the outputs nobody differentiates
    at::Tensor loss, stats;
    if (one_pass) {
      static auto fwd_grad = op<XentFwdGradSig>("minift::xent_fwd_grad");
      at::Tensor dz;
      std::tie(loss, stats, dz) = fwd_grad.call(logits, target, ignore_index, label_smoothing, reduction);
      ctx->saved_data["dz"] = dz;
    } else {
      static auto fwd = op<XentFwdSig>("minift::xent_fwd");
      std::tie(loss, stats) = fwd.call(logits, target, weight, ignore_index, label_smoothing, reduction);
    }
    ctx->save_for_backward({logits, target, stats, weight.has_value() ? *weight : at::Tensor()});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({stats});
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(7);                 // loss unused: no gradient
    auto s = ctx->get_saved_variables();
    auto g = grads[0].to(s[2].scalar_type()).contiguous();        // the loss's dtype, float32 or float64
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt(), reduction = ctx->saved_data["reduction"].toInt();
    const double smoothing = ctx->saved_data["label_smoothing"].toDouble();
    at::Tensor dz;
    auto kept = ctx->saved_data.find("dz");
    if (kept != ctx->saved_data.end() && kept->second.isTensor()) {
      static auto bwd_into = op<XentBwdIntoSig>("minift::xent_bwd_into");
      at::Tensor buffer = kept->second.toTensor();
      kept->second = c10::IValue();                                 // handed out once
      dz = bwd_into.call(buffer, g, s[0], s[1], s[2], ignore_index, smoothing, reduction);
    } else {
      static auto bwd = op<XentBwdSig>("minift::xent_bwd");
      std::optional<at::Tensor> weight;
      if (s[3].defined()) weight = s[3];
      dz = bwd.call(g, s[0], s[1], weight, s[2], ignore_index, smoothing, reduction);
    }
    return {dz, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// y = x * keep / (1 - p). Saves the keep mask; dx = dy * keep / (1 - p).
struct DropoutFunction : public torch::autograd::Function<DropoutFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, double p, int64_t seed, int64_t offset) {
    static auto fwd = op<DropoutFwdSig>("minift::dropout_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);   // no zero tensors for the outputs nobody differentiates
    auto [y, keep] = fwd.call(x, p, seed, offset);
    ctx->save_for_backward({keep});
    ctx->saved_data["scale"] = 1.0 / (1.0 - p);
    ctx->mark_non_differentiable({keep});
    return {y, keep};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(4);
    auto keep = ctx->get_saved_variables()[0];
    return {at::native_dropout_backward(grads[0], keep, ctx->saved_data["scale"].toDouble()), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// The fused layers' inputs may come in different dtypes (autocast: bfloat16 activations, float32
// parameters); their backward ops compute in float32/float64, and each gradient is rounded to its
// input's dtype here.
static void save_dtypes(AutogradContext* ctx, std::initializer_list<std::pair<const char*, const at::Tensor&>> ts) {
  for (const auto& [name, t] : ts) ctx->saved_data[std::string("dtype_") + name] = (int64_t)t.scalar_type();
}
static at::Tensor in_dtype(AutogradContext* ctx, const char* name, const at::Tensor& grad) {
  const auto st = (at::ScalarType)ctx->saved_data[std::string("dtype_") + name].toInt();
  return grad.defined() && grad.scalar_type() != st ? grad.to(st) : grad;
}

// out = LayerNorm(dropout(y) + x). Saves z = dropout(y) + x, the row mean and rstd, the weight and the
// keep mask; the backward gives dx = dz and dy = dz keep / (1 - p): the same tensor when p = 0.
struct AddLayerNormFunction : public torch::autograd::Function<AddLayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, double eps, double p, int64_t seed, int64_t offset) {
    static auto fwd = op<AddLnFwdSig>("minift::add_layer_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);   // no zero tensors for the outputs nobody differentiates
    auto [out, z, mean, rstd, keep] = fwd.call(y, x, weight, bias, eps, p, seed, offset);
    ctx->save_for_backward({z, weight, mean, rstd, keep});
    ctx->saved_data["p"] = p;
    save_dtypes(ctx, {{"y", y}, {"x", x}, {"weight", weight}, {"bias", bias}});
    ctx->mark_non_differentiable({z, mean, rstd, keep});
    return {out, z, mean, rstd, keep};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(8);
    static auto bwd = op<AddLnBwdSig>("minift::add_layer_norm_bwd");
    auto s = ctx->get_saved_variables();
    auto [dx, dy, dweight, dbias] =
        bwd.call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], ctx->saved_data["p"].toDouble());
    const bool same = ctx->saved_data["p"].toDouble() == 0.0;    // no dropout: dy = dx, one tensor
    // computed in float32/float64; each rounded to its input's dtype (autocast: dy to y's bfloat16)
    return {in_dtype(ctx, "y", same ? dx : dy), in_dtype(ctx, "x", dx), in_dtype(ctx, "weight", dweight),
            in_dtype(ctx, "bias", dbias), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// out = GELU(h + bias). Saves pre = h + bias; the backward gives dh = dout GELU'(pre) and its column sum.
struct BiasGeluFunction : public torch::autograd::Function<BiasGeluFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& bias) {
    static auto fwd = op<BiasGeluFwdSig>("minift::bias_gelu_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);   // no zero tensors for the outputs nobody differentiates
    auto [out, pre] = fwd.call(h, bias);
    ctx->save_for_backward({pre});
    save_dtypes(ctx, {{"bias", bias}});
    ctx->mark_non_differentiable({pre});
    return {out, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(2);
    static auto bwd = op<BiasGeluBwdSig>("minift::bias_gelu_bwd");
    auto [dh, dbias] = bwd.call(grads[0].contiguous(), ctx->get_saved_variables()[0]);
    return {dh, in_dtype(ctx, "bias", dbias)};                     // dh in out's dtype, which is h's
  }
};

// y = x W^T + b (linear.cpp). Saves x and W; dx = dy W, dW = dy^T x, db = the column sums of dy,
// each computed only where its input wants a gradient.
struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
    static auto fwd = op<LinearFwdSig>("minift::linear_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({x, weight});
    ctx->saved_data["bias"] = bias.has_value();   // an absent bias is no input edge: needs_input_grad(2) would be out of range
    return fwd.call(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto gemm = op<GemmSig>("minift::gemm");
    auto s = ctx->get_saved_variables();
    const at::Tensor& x = s[0];
    const at::Tensor& weight = s[1];
    const at::Tensor dy = grads[0].reshape({-1, weight.size(0)}).contiguous();
    at::Tensor dx, dweight, dbias;
    if (ctx->needs_input_grad(0)) dx = gemm.call(dy, weight, false, false, std::nullopt).view(x.sizes());
    if (ctx->needs_input_grad(1)) dweight = gemm.call(dy, x.reshape({-1, x.size(-1)}), true, false, std::nullopt);
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2)) dbias = dy.sum(0);
    return {dx, dweight, dbias};
  }
};

static at::Tensor linear_fwd_autograd(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias) {
  return LinearFunction::apply(x, weight, bias);
}

static std::tuple<at::Tensor, at::Tensor> attention_fwd_autograd(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v,
                                                                 const std::optional<at::Tensor>& mask, double p,
                                                                 double scale, int64_t seed, int64_t offset) {
  auto r = AttentionFunction::apply(q, k, v, mask, p, scale, seed, offset);
  return {r[0], r[1]};
}

static std::tuple<at::Tensor, at::Tensor> xent_fwd_autograd(const at::Tensor& logits, const at::Tensor& target,
                                                            const std::optional<at::Tensor>& weight,
                                                            int64_t ignore_index, double label_smoothing,
                                                            int64_t reduction) {
  TORCH_CHECK(!weight.has_value() || !weight->requires_grad() || !at::GradMode::is_enabled(),
              "softmax_cross_entropy: the class weights get no gradient; pass weight.detach() (got a weight "
              "that requires grad)");
  // Only for the mean: `loss.backward()` on it brings grad = 1, and the forward's dz is the answer.
  // A scaled loss (the trainer's sum / count, gradient accumulation, a GradScaler) would bring another
  // grad, and then dz is written twice (more traffic than the two passes), so the sum keeps two passes.
  // Rows longer than a warp holds take the two passes (xent.cu says why).
  const bool one_pass = logits.is_cuda() && reduction == kReduceMean && !weight.has_value() &&
                        logits.requires_grad() && at::GradMode::is_enabled() &&
                        logits.dim() == 2 && logits.size(1) <= kXentOnePassMaxClasses;
  auto r = XentFunction::apply(logits, target, weight, ignore_index, label_smoothing, reduction, one_pass);
  return {r[0], r[1]};
}

static std::tuple<at::Tensor, at::Tensor> dropout_fwd_autograd(const at::Tensor& x, double p, int64_t seed,
                                                               int64_t offset) {
  auto r = DropoutFunction::apply(x, p, seed, offset);
  return {r[0], r[1]};
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_autograd(
    const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps, double p,
    int64_t seed, int64_t offset) {
  auto r = AddLayerNormFunction::apply(y, x, weight, bias, eps, p, seed, offset);
  return {r[0], r[1], r[2], r[3], r[4]};
}

static std::tuple<at::Tensor, at::Tensor> bias_gelu_fwd_autograd(const at::Tensor& h, const at::Tensor& bias) {
  auto r = BiasGeluFunction::apply(h, bias);
  return {r[0], r[1]};
}

TORCH_LIBRARY_IMPL(minift, Autograd, m) {
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_autograd);
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_autograd);
  m.impl("attention_fwd", &attention_fwd_autograd);
  m.impl("xent_fwd", &xent_fwd_autograd);
  m.impl("dropout_fwd", &dropout_fwd_autograd);
  m.impl("linear_fwd", &linear_fwd_autograd);
}

}  // namespace minift
