// The reduction argument of the cross-entropy ops (xent_fwd and xent_bwd, CPU and CUDA), numbered as
// at::Reduction numbers it (checks.h asserts that). The one definition: the C++ kernels and the CUDA
// launchers include this file, and Python reads the names in code order from the op
// minift::xent_reduction_names (cross_entropy.cpp).
#pragma once
#include <stdint.h>

namespace minift {

enum XentReduction : int64_t { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

// The longest row the one-pass CUDA forward (xent_fwd_grad, xent.cu) takes: a warp per row. The
// autograd wrapper asks for the one pass only up to this length.
constexpr int64_t kXentOnePassMaxClasses = 1024;

}  // namespace minift
