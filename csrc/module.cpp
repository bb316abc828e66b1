// The Python module minift._C and the schemas of the `minift` operator library.
// Importing minift._C runs the TORCH_LIBRARY blocks: the ops are then torch.ops.minift.<name>,
// with CPU kernels (attention.cpp, cross_entropy.cpp, elementwise.cpp: dropout and AdamW, layer_norm.cpp,
// gelu.cpp), autograd (autograd.cpp) and, when built, CUDA kernels (cuda/).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu_gemm.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace minift {

// How the CPU kernels were built and what they reach, for `minift doctor` and the tests.
std::string cpu_kernel_info() {
#if defined(CPU_CAPABILITY_AVX512)
  std::string simd = "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  std::string simd = "AVX2";
#else
  std::string simd = "none (plain loops)";
#endif
  // attention_matmul: what the attention kernels' small block products call (cpu_gemm.h); the linear
  // layers' float32 products are chosen apart (linear.cpp, gemm_backend)
  return std::string("simd=") + simd + "; attention_matmul=" + (have_blas() ? "BLAS" : "own loop");
}

}  // namespace minift

TORCH_LIBRARY(minift, m) {
  // "simd=...; matmul=...": what the CPU kernels were built with, for `minift doctor` and the tests.
  m.def("cpu_kernel_info() -> str", &minift::cpu_kernel_info);
  // q (B, H, Tq, D), k and v (B, H, Tk, D), mask (B, Tk) bool, True = keep.
  // Returns O (B, H, Tq, D) and the row log-sum-exp L (B, H, Tq) in float32 (float64 for float64).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float dropout_p, float scale, "
        "int seed, int offset) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? key_padding_mask, float dropout_p, float scale, int seed, int offset) -> (Tensor, Tensor, Tensor)");
  // Packed attention (CPU): the sequences' tokens one after another, no padding (attention.cpp).
  m.def("attention_packed_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_q, Tensor cu_k, int Tq, int Tk, "
        "float dropout_p, float scale, int seed, int offset) -> (Tensor, Tensor)");
  m.def("attention_packed_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_q, "
        "Tensor cu_k, int Tq, int Tk, float dropout_p, float scale, int seed, int offset) -> (Tensor, Tensor, Tensor)");
  // The dropout keep-mask (B, H, Tq, Tk) the attention kernels draw for (seed, offset), on like's device.
  m.def("dropout_mask(Tensor like, int B, int H, int Tq, int Tk, float p, int seed, int offset) -> Tensor");
  // logits (N, C), target (N,) int64; reduction 0 = none, 1 = mean, 2 = sum (at::Reduction's numbers).
  // Returns the loss, (N,) for none and () otherwise, and the row statistics (2, N) that the backward
  // reads: row 0 a shift a_n, row 1 b_n = log sum_c exp(z_nc - a_n), so that log p_nc =
  // (z_nc - a_n) - b_n; float32 (float64 for float64). The CPU kernel takes a_n = max_c z_nc; the
  // CUDA kernels (for now) a_n = the log-sum-exp and b_n = 0 (see cuda/cuda_ops.cpp).
  // weight: optional per-class weights (C,) in the logits' dtype, as F.cross_entropy(weight=...).
  m.def("xent_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, "
        "int reduction) -> (Tensor, Tensor)");
  // grad: dL/d(loss), (N,) for none and () otherwise. Returns dlogits (N, C) = (softmax - smoothed
  // one-hot) * the row's weight (grad_n, grad, or grad / number of rows not ignored), with class
  // weights as derived in cross_entropy.cpp (the mean then divides by the kept targets' weights).
  m.def("xent_bwd(Tensor grad, Tensor logits, Tensor target, Tensor? weight, Tensor stats, int ignore_index, "
        "float label_smoothing, int reduction) -> Tensor");
  // The one-pass forward (CUDA; reduction mean or sum, no class weights): as xent_fwd, plus dlogits for
  // grad = 1, written in the same pass over the logits.
  m.def("xent_fwd_grad(Tensor logits, Tensor target, int ignore_index, float label_smoothing, int reduction) "
        "-> (Tensor, Tensor, Tensor)");
  // Its backward: dz (from xent_fwd_grad) is returned as it is when grad is exactly 1 (checked on the
  // GPU), else overwritten with xent_bwd's result for grad.
  m.def("xent_bwd_into(Tensor(a!) dz, Tensor grad, Tensor logits, Tensor target, Tensor stats, int ignore_index, "
        "float label_smoothing, int reduction) -> Tensor(a!)");
  // AdamW's update of one parameter in place (CPU, and CUDA for float32): param, exp_avg, exp_avg_sq are written.
  m.def("adamw_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, int step) -> ()");
  // Inverted dropout of x (CPU and CUDA): y = x keep / (1 - p) with Philox bits of (seed, offset), and the keep mask.
  m.def("dropout_fwd(Tensor x, float p, int seed, int offset) -> (Tensor, Tensor)");
  // out = LayerNorm(dropout(y) + x) over the last dim (CPU), y and x (..., H), weight and bias (H,); the
  // dropout with Philox bits of (seed, offset) as dropout_fwd draws them. Returns out, z = dropout(y) + x,
  // the row mean and rstd (z, mean, rstd in float32 for float16/bfloat16) and the keep mask (empty when p = 0).
  m.def("add_layer_norm_fwd(Tensor y, Tensor x, Tensor weight, Tensor bias, float eps, float dropout_p, int seed, "
        "int offset) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns dx, dy (empty when p = 0: dy = dx then), dweight, dbias.
  m.def("add_layer_norm_bwd(Tensor dout, Tensor z, Tensor weight, Tensor mean, Tensor rstd, Tensor keep, "
        "float dropout_p) -> (Tensor, Tensor, Tensor, Tensor)");
  // out = GELU(h + bias) (erf form, CPU), h (..., I), bias (I,). Returns out and pre = h + bias (float32
  // for float16/bfloat16), saved for the backward.
  m.def("bias_gelu_fwd(Tensor h, Tensor bias) -> (Tensor, Tensor)");
  // Returns dh = dout GELU'(pre) and dbias, its column sum.
  m.def("bias_gelu_bwd(Tensor dout, Tensor pre) -> (Tensor, Tensor)");
}
