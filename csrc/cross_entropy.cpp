// Fused softmax cross-entropy on the CPU, rows of logits split across threads by at::parallel_for.
//
// Forward, row n with target y (label smoothing eps, C classes):
//   m = max_c z_c,  lse = m + log sum_c exp(z_c - m)     (stable for |z| = 1e4)
//   loss_n = (1 - eps)(lse - z_y) + eps (lse - mean_c z_c),   0 when y = ignore_index
// and the reduction: "none" returns loss_n, "sum" sum_n loss_n, "mean" that sum over the number of
// rows whose target is not ignored (0 when every row is ignored, where F.cross_entropy gives NaN).
// Backward, given g = dL/d(output): w_n = g_n ("none"), g ("sum") or g / count ("mean"), and
//   dz_c = (exp(z_c - lse) - eps/C - (1 - eps)[c = y]) * w_n,   0 for ignored rows
// One read of the logits in each pass, one write of the gradient. The reduction lives here, in the
// op, rather than in Python: for a small problem (N = 4096, C = 2) the three tensor ops of a mean
// and their backward cost more than the kernels themselves.
//
// Two row walkers for float32/float64. Long rows go one at a time through the
// SIMD helpers of cpu_vec.h. Short rows (C = 2 for sentiment, 9 for NER) would spend their time in
// per-row vector set-up and scalar exp/log calls, so a block of them is handled together: subtract
// each row's max into one contiguous buffer, exponentiate the whole buffer in vectors, then take the
// logs of the block's row sums in vectors too. float16 and bfloat16 rows are widened element by element.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>

#include "checks.h"
#include "cpu_vec.h"

namespace minift {

template <typename T> struct XAcc { using type = float; };
template <> struct XAcc<double> { using type = double; };

// Rows up to these lengths use the block walker: measured on a 2-core AVX2 machine, it is faster
// for C <= 16 in the forward (2.2x at C = 2) and C <= 8 in the backward, slower beyond.
constexpr int64_t kShortRowFwd = 16, kShortRowBwd = 8;
constexpr int64_t kBlockElems = 1024;  // elements of short rows handled together

// Rows per task of at::parallel_for: about 2k elements, enough work to pay for waking a thread.
static int64_t xent_grain(int64_t C) { return std::max<int64_t>(1, 2048 / C); }

template <typename T>
static void vec_exp_inplace(T* x, int64_t n) {
  at::vec::map([](Vec<T> v) { return v.exp(); }, x, x, n);
}

template <typename T>
static void vec_log_inplace(T* x, int64_t n) {
  at::vec::map([](Vec<T> v) { return v.log(); }, x, x, n);
}

// lse and loss of rows [begin, end), whose targets are already checked.
template <typename scalar_t>
static void xent_fwd_rows(const scalar_t* z, const int64_t* target, typename XAcc<scalar_t>::type* loss,
                          typename XAcc<scalar_t>::type* lse, int64_t begin, int64_t end, int64_t C,
                          int64_t ignore_index, double eps) {
  using acc_t = typename XAcc<scalar_t>::type;
  auto finish = [&](int64_t n, acc_t m, acc_t log_s, acc_t sum_z) {
    const acc_t l = m + log_s;                                       // lse = m + log sum exp(z - m)
    lse[n] = l;
    const int64_t y = target[n];
    loss[n] = y == ignore_index
                  ? (acc_t)0
                  : (acc_t)(1.0 - eps) * (l - (acc_t)z[n * C + y]) + (acc_t)eps * (l - sum_z / (acc_t)C);
  };
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (C <= kShortRowFwd) {
      acc_t buf[kBlockElems], maxes[kBlockElems], sums[kBlockElems], sum_zs[kBlockElems];
      const int64_t R = kBlockElems / C;
      for (int64_t r0 = begin; r0 < end; r0 += R) {
        const int64_t rows = std::min(R, end - r0);
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* row = z + (r0 + r) * C;
          acc_t m = row[0], sz = 0;
          for (int64_t c = 1; c < C; ++c) m = std::max(m, row[c]);
          for (int64_t c = 0; c < C; ++c) buf[r * C + c] = row[c] - m;
          if (eps > 0)
            for (int64_t c = 0; c < C; ++c) sz += row[c];
          maxes[r] = m;
          sum_zs[r] = sz;
        }
        vec_exp_inplace(buf, rows * C);                              // exp(z - m), the whole block at once
        for (int64_t r = 0; r < rows; ++r) {
          acc_t s = 0;
          for (int64_t c = 0; c < C; ++c) s += buf[r * C + c];
          sums[r] = s;
        }
        vec_log_inplace(sums, rows);
        for (int64_t r = 0; r < rows; ++r) finish(r0 + r, maxes[r], sums[r], sum_zs[r]);
      }
      return;
    }
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = z + n * C;
      const acc_t m = row_max(row, C);
      const acc_t sum_z = eps > 0 ? row_sum(row, C) : (acc_t)0;
      finish(n, m, std::log(row_exp_sum_only(row, C, m)), sum_z);
    }
  } else {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = z + n * C;
      acc_t m = -std::numeric_limits<acc_t>::infinity(), sum_z = 0, s = 0;
      for (int64_t c = 0; c < C; ++c) {
        acc_t x = (acc_t)row[c];
        m = x > m ? x : m;
        sum_z += x;
      }
      for (int64_t c = 0; c < C; ++c) s += std::exp((acc_t)row[c] - m);
      finish(n, m, std::log(s), sum_z);
    }
  }
}

// dz of rows [begin, end); w == nullptr means every row has the weight w_all.
template <typename scalar_t>
static void xent_bwd_rows(const typename XAcc<scalar_t>::type* w, typename XAcc<scalar_t>::type w_all,
                          const scalar_t* z, const int64_t* target, const typename XAcc<scalar_t>::type* lse,
                          scalar_t* dz, int64_t begin, int64_t end, int64_t C, int64_t ignore_index, double eps) {
  using acc_t = typename XAcc<scalar_t>::type;
  const acc_t smooth = (acc_t)(eps / (double)C), hit = (acc_t)(1.0 - eps);
  auto weight = [&](int64_t n) { return w == nullptr ? w_all : w[n]; };
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (C <= kShortRowBwd) {
      // the rows [begin, end) of dz are contiguous: fill with z - lse, exponentiate in place, then scale
      for (int64_t n = begin; n < end; ++n) {
        const acc_t l = lse[n];
        for (int64_t c = 0; c < C; ++c) dz[n * C + c] = z[n * C + c] - l;
      }
      vec_exp_inplace(dz + begin * C, (end - begin) * C);            // softmax_c
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* out = dz + n * C;
        const int64_t y = target[n];
        const acc_t g = y == ignore_index ? (acc_t)0 : weight(n);
        for (int64_t c = 0; c < C; ++c) out[c] = (out[c] - smooth) * g;  // (softmax_c - eps/C) w_n
        if (y != ignore_index) out[y] -= hit * g;                    // - (1 - eps) w_n at the target
      }
      return;
    }
  }
  for (int64_t n = begin; n < end; ++n) {
    const int64_t y = target[n];
    scalar_t* out = dz + n * C;
    if (y == ignore_index) {
      std::fill(out, out + C, (scalar_t)0);
      continue;
    }
    const scalar_t* row = z + n * C;
    const acc_t g = weight(n), l = lse[n];
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      row_softmax_minus(row, out, C, l, smooth, g);                  // (softmax_c - eps/C) w_n
      out[y] -= hit * g;                                             // - (1 - eps) w_n at the target
    } else {
      for (int64_t c = 0; c < C; ++c) {
        acc_t p = std::exp((acc_t)row[c] - l);                       // softmax_c
        out[c] = (scalar_t)((p - smooth - (c == y ? hit : (acc_t)0)) * g);  // (p - q) w_n
      }
    }
  }
}

static void check_targets(const int64_t* target, int64_t N, int64_t C, int64_t ignore_index) {
  std::atomic<int64_t> first_bad{N};
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t y = target[n];
      if (y != ignore_index && (y < 0 || y >= C)) {
        int64_t seen = first_bad.load();
        while (n < seen && !first_bad.compare_exchange_weak(seen, n)) {
        }
        return;
      }
    }
  });
  const int64_t bad = first_bad.load();
  TORCH_CHECK(bad == N, "softmax_cross_entropy: expected targets in [0, ", C, ") or ignore_index ", ignore_index,
              ", got ", bad < N ? target[bad] : 0, " at row ", bad);
}

static int64_t count_kept(const int64_t* target, int64_t N, int64_t ignore_index) {
  int64_t count = 0;
  for (int64_t n = 0; n < N; ++n) count += target[n] != ignore_index;
  return count;
}

std::tuple<at::Tensor, at::Tensor> xent_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                int64_t ignore_index, double label_smoothing, int64_t reduction) {
  check_xent_inputs(logits, target, label_smoothing, at::kCPU);
  check_reduction(reduction);
  const int64_t N = logits.size(0), C = logits.size(1);
  const int64_t* t = target.data_ptr<int64_t>();
  check_targets(t, N, C, ignore_index);
  auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto rows = maybe_poison(at::empty({N}, logits.options().dtype(acc)));
  auto lse = maybe_poison(at::empty({N}, logits.options().dtype(acc)));
  at::Tensor loss = rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "xent_fwd_cpu", [&] {
    using acc_t = typename XAcc<scalar_t>::type;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    acc_t* l = rows.data_ptr<acc_t>();
    acc_t* s = lse.data_ptr<acc_t>();
    at::parallel_for(0, N, xent_grain(C), [&](int64_t begin, int64_t end) {
      xent_fwd_rows<scalar_t>(z, t, l, s, begin, end, C, ignore_index, label_smoothing);
    });
    if (reduction != kReduceNone) {
      double total = 0;                                              // in row order: the same sum on any thread count
      for (int64_t n = 0; n < N; ++n) total += l[n];
      if (reduction == kReduceMean) total /= (double)std::max<int64_t>(1, count_kept(t, N, ignore_index));
      loss = at::empty({}, logits.options().dtype(acc));
      loss.data_ptr<acc_t>()[0] = (acc_t)total;
    }
  });
  return {loss, lse};
}

at::Tensor xent_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                        const at::Tensor& lse, int64_t ignore_index, double label_smoothing, int64_t reduction) {
  check_xent_inputs(logits, target, label_smoothing, at::kCPU);
  check_reduction(reduction);
  const int64_t N = logits.size(0), C = logits.size(1);
  auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool per_row = reduction == kReduceNone;
  check_xent_backward_inputs(grad, lse, logits, acc, reduction);
  const int64_t* t = target.data_ptr<int64_t>();
  auto dz = maybe_poison(at::empty_like(logits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "xent_bwd_cpu", [&] {
    using acc_t = typename XAcc<scalar_t>::type;
    const acc_t* w = per_row ? grad.data_ptr<acc_t>() : nullptr;
    acc_t w_all = per_row ? (acc_t)0 : grad.data_ptr<acc_t>()[0];
    if (reduction == kReduceMean) w_all /= (acc_t)std::max<int64_t>(1, count_kept(t, N, ignore_index));
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const acc_t* l = lse.data_ptr<acc_t>();
    scalar_t* d = dz.data_ptr<scalar_t>();
    at::parallel_for(0, N, xent_grain(C), [&](int64_t begin, int64_t end) {
      xent_bwd_rows<scalar_t>(w, w_all, z, t, l, d, begin, end, C, ignore_index, label_smoothing);
    });
  });
  return dz;
}

TORCH_LIBRARY_IMPL(minift, CPU, m) {
  m.impl("xent_fwd", &xent_fwd_cpu);
  m.impl("xent_bwd", &xent_bwd_cpu);
}

}  // namespace minift
