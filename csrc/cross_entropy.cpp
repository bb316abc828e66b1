// Fused softmax cross-entropy on the CPU, rows of logits split across threads by at::parallel_for.
//
// Forward, row n with target y (label smoothing eps, C classes):
//   m = max_c z_c,   log s = log sum_c e^{z_c - m} = log1p(r),   r = s - 1 = sum_{c != k} e^{z_c - m}
// where k is one position of the max: its e^0 = 1 is left out of the sum rather than subtracted
// after it, so the r of a confident row (1e-30 when the other probabilities are that small) keeps
// its digits. With log p_c = (z_c - m) - log s,
//   loss_n = (1 - eps) nll + eps smooth,   nll = -log p_y = (m - z_y) + log s,
//   smooth = -(1/C) sum_c log p_c = log s + (1/C) sum_c (m - z_c),
// 0 when y = ignore_index. Both are sums of non-negative terms, and m never meets log s in one
// number: the log-sum-exp lse = m + log s rounds log s away once |m| is large (float32's spacing
// at 1e8 is 8: the loss of three equal logits, log 3, came out 0 as lse - z_y), and
// mean_c z_c - m cancels the same way. Long rows add their e^{z_c - m} in vectors over chunks of
// 128 and the chunk sums in double, and sum_c (m - z_c) in double (cpu_vec.h).
// The forward saves m and log s for the backward: the (2, N) row statistics, never their sum.
// The reduction: "none" returns loss_n, "sum" sum_n loss_n, "mean" that sum over the number of rows
// whose target is not ignored (0 when every row is ignored, where F.cross_entropy gives NaN); the
// sum runs in row order in double with Neumaier's compensation, the same on any thread count.
// With class weights w (F.cross_entropy's weight=, finite and >= 0, S_w = sum_c w_c):
//   loss_n = (1 - eps) w_y nll + (eps/C) sum_c w_c (-log p_c),
//   sum_c w_c (-log p_c) = S_w log s + sum_c w_c (m - z_c),
// and "mean" divides by sum_n w_{y_n} over the rows not ignored; the backward's formulas are above
// xent_bwd_rows.
// Backward, given g = dL/d(output): w_n = g_n ("none"), g ("sum") or g / count ("mean"), and
//   dz_c = (p_c - q_c) w_n,   p_c = e^{(z_c - m) - log s},   q_c = eps/C + (1 - eps)[c = y]
// (m and log s subtracted one after the other), and at the target
//   p_y - q_y = expm1((z_y - m) - log s) + eps (1 - 1/C),
// p_y - 1 without the cancellation of e^{...} - 1 when p_y is close to 1. 0 for ignored rows.
// One read of the logits in each pass, one write of the gradient. The reduction lives here, in the
// op, rather than in Python: for a small problem (N = 4096, C = 2) the three tensor ops of a mean
// and their backward cost more than the kernels themselves.
//
// Two row walkers for float32/float64. Long rows go one at a time through the
// SIMD helpers of cpu_vec.h. Short rows (C = 2 for sentiment, 9 for NER) would spend their time in
// per-row vector set-up and scalar exp/log calls, so a block of them is handled together: subtract
// each row's max into one contiguous buffer, exponentiate the whole buffer in vectors, then take
// log1p of the block's r in vectors too. The backward of either walker takes the expm1 of a block's
// target entries in vectors. float16 and bfloat16 rows are widened element by element.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

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

template <typename T, typename F>
static void vec_map_inplace(T* x, int64_t n, F f) {
  at::vec::map(f, x, x, n);
}

// The sum of x[0..n) in row order, compensated (cpu_vec.h): float64 row losses add up to float64
// accuracy, and the result does not depend on the thread count.
template <typename T>
static double row_order_sum(const T* x, int64_t n) {
  CompensatedSum total;
  for (int64_t i = 0; i < n; ++i) total.add((double)x[i]);
  return total.sum();
}

// The per-class weights of a weighted loss, in the accumulation type (w == nullptr: every w_c = 1).
template <typename acc_t>
struct ClassWeights {
  const acc_t* w = nullptr;  // (C,) w_c
  double sum = 0;            // S_w = sum_c w_c
  const acc_t* b = nullptr;  // (C,) (eps / C) w_c, the backward's smoothing term (set by the backward)
};

// loss, m and log s of rows [begin, end), whose targets are already checked.
template <typename scalar_t>
static void xent_fwd_rows(const scalar_t* z, const int64_t* target, ClassWeights<typename XAcc<scalar_t>::type> cw,
                          typename XAcc<scalar_t>::type* loss, typename XAcc<scalar_t>::type* row_max_out,
                          typename XAcc<scalar_t>::type* log_s_out, int64_t begin, int64_t end, int64_t C,
                          int64_t ignore_index, double eps) {
  using acc_t = typename XAcc<scalar_t>::type;
  // gap = sum_c (m - z_c), or sum_c w_c (m - z_c) with class weights: only needed (and only
  // computed) when eps > 0
  auto finish = [&](int64_t n, acc_t m, acc_t log_s, double gap) {
    row_max_out[n] = m;
    log_s_out[n] = log_s;
    const int64_t y = target[n];
    if (y == ignore_index) {
      loss[n] = 0;
      return;
    }
    const acc_t nll = (m - (acc_t)z[n * C + y]) + log_s;              // -log p_y = (m - z_y) + log s
    if (cw.w == nullptr) {
      if (eps == 0) {
        loss[n] = nll;
        return;
      }
      const acc_t smooth = log_s + (acc_t)(gap / (double)C);         // log s + (1/C) sum_c (m - z_c)
      loss[n] = (acc_t)(1.0 - eps) * nll + (acc_t)eps * smooth;
      return;
    }
    const acc_t wy = cw.w[y];
    if (eps == 0) {
      loss[n] = wy * nll;                                            // w_y (-log p_y)
      return;
    }
    const double smooth = cw.sum * (double)log_s + gap;              // sum_c w_c (-log p_c)
    loss[n] = (acc_t)((1.0 - eps) * (double)wy * (double)nll + eps / (double)C * smooth);
  };
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    auto gap_of = [&](const scalar_t* row, acc_t m) {
      if (eps == 0) return 0.0;
      return cw.w == nullptr ? row_gap_sum(row, C, m) : row_weighted_gap_sum(row, cw.w, C, m);
    };
    if (C <= kShortRowFwd) {
      acc_t buf[kBlockElems], maxes[kBlockElems], rs[kBlockElems];
      double gaps[kBlockElems];
      const int64_t R = kBlockElems / C;
      for (int64_t r0 = begin; r0 < end; r0 += R) {
        const int64_t rows = std::min(R, end - r0);
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* row = z + (r0 + r) * C;
          acc_t m = row[0];
          int64_t k = 0;                                             // the first position of the max
          for (int64_t c = 1; c < C; ++c) {
            k = row[c] > m ? c : k;
            m = std::max(m, row[c]);
          }
          for (int64_t c = 0; c < C; ++c) buf[r * C + c] = row[c] - m;  // z_c - m <= 0
          buf[r * C + k] = -std::numeric_limits<acc_t>::infinity();  // e^-inf = 0: the 1 that r = s - 1 leaves out
          maxes[r] = m;
          gaps[r] = gap_of(row, m);
        }
        vec_map_inplace(buf, rows * C, [](Vec<acc_t> v) { return v.exp(); });  // e^{z - m}, the block at once
        for (int64_t r = 0; r < rows; ++r) {
          acc_t s = 0;                                               // r = s - 1
          for (int64_t c = 0; c < C; ++c) s += buf[r * C + c];
          rs[r] = s;
        }
        vec_map_inplace(rs, rows, [](Vec<acc_t> v) { return v.log1p(); });  // log s = log1p(r)
        for (int64_t r = 0; r < rows; ++r) finish(r0 + r, maxes[r], rs[r], gaps[r]);
      }
      return;
    }
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = z + n * C;
      const acc_t m = row_max(row, C);
      finish(n, m, (acc_t)std::log1p(row_exp_sum_minus_one(row, C, m)), gap_of(row, m));
    }
  } else {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = z + n * C;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (int64_t c = 0; c < C; ++c) m = std::max(m, (acc_t)row[c]);
      double s = 0, ties = -1, gap = 0;                              // r = s + ties: every e^0 but one
      for (int64_t c = 0; c < C; ++c) {
        const acc_t x = (acc_t)row[c];
        if (x == m) ties += 1;
        else s += (double)std::exp(x - m);
        gap += (cw.w == nullptr ? 1.0 : (double)cw.w[c]) * ((double)m - (double)x);
      }
      finish(n, m, (acc_t)std::log1p(s + ties), gap);
    }
  }
}

// dz of rows [begin, end); w holds each row's scale g_n (g_n for "none"), w == nullptr means every
// row has the scale w_all (g, or g / divisor for "mean"). With class weights cw.w = (w_c):
//   dz_c = (a_n p_c - b_c) g_n,   dz_y = (a_n (p_y - 1) + t_n) g_n
// with a_n = 1, b_c = eps/C, t_n = eps (1 - 1/C) without class weights, and with them
//   a_n = (1 - eps) w_y + (eps/C) S_w,   b_c = (eps/C) w_c,   t_n = (eps/C) (S_w - w_y),
// the gradient of (1 - eps) w_y (-log p_y) + (eps/C) sum_c w_c (-log p_c): with q_c = b_c +
// (1 - eps) w_y [c = y] it is a_n p_c - q_c, a_n = sum_c q_c, and at the target
// a_n p_y - q_y = a_n (p_y - 1) + (a_n - b_y - (1 - eps) w_y) = a_n (p_y - 1) + t_n.
// That form keeps the digits of a confident row (p_y = 1 - 1e-30) but cancels when t_n is most of
// a_n, as for a target weighted 0 (q_y = 0, t_n = a_n, p_y = 1/9: a (p_y - 1) + a loses 3 bits).
// With class weights the target entry is therefore a_n (p_y - 1) + t_n when p_y > 1/2 and
// a_n p_y - q_y otherwise, each in one fused multiply-add (weighted_target), from p_y and p_y - 1
// taken in vectors over a block of rows. Without them t_n = eps (1 - 1/C) is at most eps of a_n = 1
// and the expm1 form alone serves.
template <typename scalar_t>
static void xent_bwd_rows(const typename XAcc<scalar_t>::type* w, typename XAcc<scalar_t>::type w_all,
                          const scalar_t* z, const int64_t* target, ClassWeights<typename XAcc<scalar_t>::type> cw,
                          const typename XAcc<scalar_t>::type* row_max_in, const typename XAcc<scalar_t>::type* log_s_in,
                          scalar_t* dz, int64_t begin, int64_t end, int64_t C, int64_t ignore_index, double eps) {
  using acc_t = typename XAcc<scalar_t>::type;
  const acc_t smooth = (acc_t)(eps / (double)C), at_target = (acc_t)(eps - eps / (double)C);
  auto weight = [&](int64_t n) { return w == nullptr ? w_all : w[n]; };
  auto factor = [&](int64_t y) {                                     // a_n
    return cw.w == nullptr ? (acc_t)1 : (acc_t)((1.0 - eps) * (double)cw.w[y] + eps / (double)C * cw.sum);
  };
  // a_n p_y - q_y with class weights, from p_y and em1_y = p_y - 1
  auto weighted_target = [&](int64_t y, acc_t p_y, acc_t em1_y) -> acc_t {
    const double wy = cw.w[y], a = (1.0 - eps) * wy + eps / (double)C * cw.sum;
    if (p_y > (acc_t)0.5) return std::fma((acc_t)a, em1_y, (acc_t)(eps / (double)C * (cw.sum - wy)));  // + t_n
    return std::fma((acc_t)a, p_y, -(acc_t)((1.0 - eps) * wy + eps / (double)C * wy));               // - q_y
  };
  // the target entry times the row's scale g: (a_n p_y - q_y) g
  auto at_y = [&](int64_t y, acc_t p_y, acc_t em1_y, acc_t g) {
    return cw.w == nullptr ? (em1_y + at_target) * g : weighted_target(y, p_y, em1_y) * g;
  };
  auto b_of = [&](int64_t c) { return cw.b == nullptr ? smooth : cw.b[c]; };
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    acc_t em1[kBlockElems];                                          // a block's log p_y, then p_y - 1
    acc_t py[kBlockElems] = {};                                      // (with class weights) p_y
    if (C <= kShortRowBwd) {
      // the rows of dz are contiguous: a block of them is filled with (z - m) - log s and
      // exponentiated in place, the block's target entries go through expm1, then all are scaled
      const int64_t R = kBlockElems / C;
      for (int64_t r0 = begin; r0 < end; r0 += R) {
        const int64_t rows = std::min(R, end - r0);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = r0 + r, y = target[n];
          const acc_t m = row_max_in[n], l = log_s_in[n];
          for (int64_t c = 0; c < C; ++c) dz[n * C + c] = (z[n * C + c] - m) - l;  // log p_c
          em1[r] = y == ignore_index ? (acc_t)0 : dz[n * C + y];
        }
        vec_map_inplace(dz + r0 * C, rows * C, [](Vec<acc_t> v) { return v.exp(); });  // p_c
        vec_map_inplace(em1, rows, [](Vec<acc_t> v) { return v.expm1(); });          // p_y - 1
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = r0 + r, y = target[n];
          scalar_t* out = dz + n * C;
          if (y == ignore_index) {
            std::fill(out, out + C, (scalar_t)0);
            continue;
          }
          const acc_t g = weight(n), a = factor(y), p_y = out[y];
          if (cw.w == nullptr)
            for (int64_t c = 0; c < C; ++c) out[c] = (out[c] - smooth) * g;           // (p_c - eps/C) g_n
          else
            for (int64_t c = 0; c < C; ++c) out[c] = std::fma(a, out[c], -cw.b[c]) * g;  // (a_n p_c - b_c) g_n
          out[y] = at_y(y, p_y, em1[r], g);                                   // (a_n p_y - q_y) g_n
        }
      }
      return;
    }
    // long rows one at a time in vectors; a block's target entries then go through expm1 together
    for (int64_t r0 = begin; r0 < end; r0 += kBlockElems) {
      const int64_t rows = std::min(kBlockElems, end - r0);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = r0 + r, y = target[n];
        scalar_t* out = dz + n * C;
        if (y == ignore_index) {
          std::fill(out, out + C, (scalar_t)0);
          em1[r] = 0;
          continue;
        }
        const scalar_t* row = z + n * C;
        const acc_t m = row_max_in[n], l = log_s_in[n];
        if (cw.w == nullptr)
          row_softmax_minus(row, out, C, m, l, smooth, weight(n));                  // (p_c - eps/C) g_n
        else
          row_softmax_scaled_minus(row, out, C, m, l, factor(y), cw.b, weight(n));  // (a_n p_c - b_c) g_n
        em1[r] = (row[y] - m) - l;                                   // log p_y
      }
      if (cw.w != nullptr) {
        std::copy(em1, em1 + rows, py);
        vec_map_inplace(py, rows, [](Vec<acc_t> v) { return v.exp(); });    // p_y
      }
      vec_map_inplace(em1, rows, [](Vec<acc_t> v) { return v.expm1(); });  // p_y - 1
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = r0 + r, y = target[n];
        if (y != ignore_index) dz[n * C + y] = at_y(y, py[r], em1[r], weight(n));
      }
    }
  } else {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t y = target[n];
      scalar_t* out = dz + n * C;
      if (y == ignore_index) {
        std::fill(out, out + C, (scalar_t)0);
        continue;
      }
      const scalar_t* row = z + n * C;
      const acc_t g = weight(n), m = row_max_in[n], l = log_s_in[n], a = factor(y);
      for (int64_t c = 0; c < C; ++c)
        out[c] = (scalar_t)((a * std::exp(((acc_t)row[c] - m) - l) - b_of(c)) * g);  // (a_n p_c - b_c) g_n
      const acc_t log_p = ((acc_t)row[y] - m) - l;
      out[y] = (scalar_t)at_y(y, std::exp(log_p), std::expm1(log_p), g);
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

// The mean's divisor: the number of rows not ignored, or with class weights the sum of their
// targets' weights w_y, as in F.cross_entropy. A divisor of 0 (every row ignored) makes the mean 0,
// where F.cross_entropy gives NaN.
template <typename acc_t>
static double mean_divisor(const int64_t* target, int64_t N, int64_t ignore_index, const acc_t* cw) {
  double total = 0;
  for (int64_t n = 0; n < N; ++n)
    if (target[n] != ignore_index) total += cw == nullptr ? 1.0 : (double)cw[target[n]];
  return total;
}

// The class weights in the accumulation type acc (a copy only when the logits are float16/bfloat16).
static at::Tensor class_weights(const std::optional<at::Tensor>& weight, at::ScalarType acc) {
  if (!weight.has_value()) return at::Tensor();
  return weight->scalar_type() == acc && weight->is_contiguous() ? *weight : weight->to(acc).contiguous();
}

// The weights' values (check_xent_weight in checks.h has checked their shape, dtype and device).
template <typename acc_t>
static void check_weight_values(const acc_t* w, int64_t C) {
  for (int64_t c = 0; c < C; ++c)
    TORCH_CHECK_VALUE(std::isfinite(w[c]) && w[c] >= 0,
                      "softmax_cross_entropy: expected finite class weights >= 0, got weight[", c, "] = ", w[c]);
}

// Returns the loss and the (2, N) row statistics the backward reads: m_n, then log s_n.
std::tuple<at::Tensor, at::Tensor> xent_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                double label_smoothing, int64_t reduction) {
  check_xent_inputs(logits, target, label_smoothing, at::kCPU);
  check_xent_weight(weight, logits);
  check_reduction(reduction);
  const int64_t N = logits.size(0), C = logits.size(1);
  const int64_t* t = target.data_ptr<int64_t>();
  check_targets(t, N, C, ignore_index);
  auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto rows = maybe_poison(at::empty({N}, logits.options().dtype(acc)));
  auto stats = maybe_poison(at::empty({2, N}, logits.options().dtype(acc)));
  auto w_acc = class_weights(weight, acc);
  at::Tensor loss = rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "xent_fwd_cpu", [&] {
    using acc_t = typename XAcc<scalar_t>::type;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    ClassWeights<acc_t> cw;
    if (w_acc.defined()) {
      cw.w = w_acc.data_ptr<acc_t>();
      check_weight_values(cw.w, C);
      cw.sum = row_order_sum(cw.w, C);
    }
    acc_t* l = rows.data_ptr<acc_t>();
    acc_t* m = stats.data_ptr<acc_t>();                              // stats[0]: the row max
    acc_t* log_s = m + N;                                            // stats[1]: log sum_c e^{z_c - m}
    at::parallel_for(0, N, xent_grain(C), [&](int64_t begin, int64_t end) {
      xent_fwd_rows<scalar_t>(z, t, cw, l, m, log_s, begin, end, C, ignore_index, label_smoothing);
    });
    if (reduction != kReduceNone) {
      double total = row_order_sum(l, N);                            // the same on any thread count
      if (reduction == kReduceMean) {
        const double divisor = mean_divisor(t, N, ignore_index, cw.w);
        total = divisor != 0 ? total / divisor : 0.0;
      }
      loss = at::empty({}, logits.options().dtype(acc));
      loss.data_ptr<acc_t>()[0] = (acc_t)total;
    }
  });
  return {loss, stats};
}

at::Tensor xent_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                        const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t ignore_index,
                        double label_smoothing, int64_t reduction) {
  check_xent_inputs(logits, target, label_smoothing, at::kCPU);
  check_xent_weight(weight, logits);
  check_reduction(reduction);
  const int64_t N = logits.size(0), C = logits.size(1);
  auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool per_row = reduction == kReduceNone;
  check_xent_backward_inputs(grad, stats, logits, acc, reduction);
  const int64_t* t = target.data_ptr<int64_t>();
  auto dz = maybe_poison(at::empty_like(logits));
  auto w_acc = class_weights(weight, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "xent_bwd_cpu", [&] {
    using acc_t = typename XAcc<scalar_t>::type;
    ClassWeights<acc_t> cw;
    std::vector<acc_t> b;                                            // (eps / C) w_c, the smoothing part of q_c
    if (w_acc.defined()) {
      cw.w = w_acc.data_ptr<acc_t>();
      check_weight_values(cw.w, C);
      cw.sum = row_order_sum(cw.w, C);
      b.resize(C);
      for (int64_t c = 0; c < C; ++c) b[c] = (acc_t)(label_smoothing / (double)C * (double)cw.w[c]);
      cw.b = b.data();
    }
    const acc_t* w = per_row ? grad.data_ptr<acc_t>() : nullptr;
    acc_t w_all = per_row ? (acc_t)0 : grad.data_ptr<acc_t>()[0];
    if (reduction == kReduceMean) {
      const double divisor = mean_divisor(t, N, ignore_index, cw.w);
      w_all = divisor != 0 ? (acc_t)((double)w_all / divisor) : (acc_t)0;
    }
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const acc_t* m = stats.data_ptr<acc_t>();
    const acc_t* log_s = m + N;
    scalar_t* d = dz.data_ptr<scalar_t>();
    at::parallel_for(0, N, xent_grain(C), [&](int64_t begin, int64_t end) {
      xent_bwd_rows<scalar_t>(w, w_all, z, t, cw, m, log_s, d, begin, end, C, ignore_index, label_smoothing);
    });
  });
  return dz;
}

// The names of the reduction argument's values in code order (reduction.h): where Python takes them from.
static std::vector<std::string> xent_reduction_names() {
  static_assert(kReduceNone == 0 && kReduceMean == 1 && kReduceSum == 2, "the names below are in code order");
  return {"none", "mean", "sum"};
}

TORCH_LIBRARY_FRAGMENT(minift, m) {
  m.def("xent_reduction_names() -> str[]", &xent_reduction_names);
}

TORCH_LIBRARY_IMPL(minift, CPU, m) {
  m.impl("xent_fwd", &xent_fwd_cpu);
  m.impl("xent_bwd", &xent_bwd_cpu);
}

}  // namespace minift
