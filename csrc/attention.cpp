// Fused attention on the CPU: softmax(Q K^T * scale + mask) V without a T x T matrix.
//
// Forward, for each (batch, head) in parallel and each query row i:
//   s_j = scale * q_i . k_j over kept keys j,  m = max_j s_j,  lse_i = m + log sum_j exp(s_j - m)
//   P_ij = exp(s_j - lse_i),  P~_ij = P_ij * keep_ij / (1 - p)     (attention dropout, Philox bits)
//   o_i = sum_j P~_ij v_j
// It saves O and the row log-sum-exp L only. A row with no kept key gives o_i = 0, lse_i = -inf.
//
// Backward recomputes P_ij = exp(scale q_i.k_j - lse_i) and regenerates keep_ij from (seed, offset):
//   D_i = dO_i . O_i  (= sum_j P_ij dP_ij)
//   dV_j += P~_ij dO_i,   dP_ij = (dO_i . v_j) * keep_ij / (1-p),   dS_ij = P_ij (dP_ij - D_i)
//   dQ_i = scale sum_j dS_ij k_j,   dK_j += scale dS_ij q_i
// Accumulation is in float (double for double inputs); half and bfloat16 are read and written as is.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "philox.h"

namespace minift {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

struct AttnDims {
  int64_t B, H, Tq, Tk, D;
};

template <typename scalar_t>
static void attention_fwd_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, const bool* mask,
                                 scalar_t* out, typename Acc<scalar_t>::type* lse, AttnDims d,
                                 double scale, double p, uint64_t seed, uint64_t offset) {
  using acc_t = typename Acc<scalar_t>::type;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const uint32_t threshold = dropout_threshold((float)p);
  const acc_t keep_scale = p > 0 ? (acc_t)(1.0 / (1.0 - p)) : (acc_t)1;
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(d.Tk), acc(d.D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H;
      const scalar_t* kb = k + bh * d.Tk * d.D;
      const scalar_t* vb = v + bh * d.Tk * d.D;
      const bool* mb = mask ? mask + b * d.Tk : nullptr;
      for (int64_t i = 0; i < d.Tq; ++i) {
        const scalar_t* qi = q + (bh * d.Tq + i) * d.D;
        acc_t m = neg_inf;
        for (int64_t j = 0; j < d.Tk; ++j) {                       // s_j = scale q_i . k_j
          if (mb && !mb[j]) { s[j] = neg_inf; continue; }
          acc_t dot = 0;
          for (int64_t c = 0; c < d.D; ++c) dot += (acc_t)qi[c] * (acc_t)kb[j * d.D + c];
          s[j] = dot * (acc_t)scale;
          m = s[j] > m ? s[j] : m;
        }
        scalar_t* oi = out + (bh * d.Tq + i) * d.D;
        if (m == neg_inf) {                                         // no kept key: o_i = 0
          for (int64_t c = 0; c < d.D; ++c) oi[c] = (scalar_t)0;
          lse[bh * d.Tq + i] = neg_inf;
          continue;
        }
        acc_t l = 0;
        for (int64_t j = 0; j < d.Tk; ++j) l += std::exp(s[j] - m);
        const acc_t lse_i = m + std::log(l);                         // lse_i = m + log sum exp(s - m)
        lse[bh * d.Tq + i] = lse_i;
        std::fill(acc.begin(), acc.end(), (acc_t)0);
        const uint64_t row = (uint64_t)(bh * d.Tq + i) * (uint64_t)d.Tk;
        for (int64_t j = 0; j < d.Tk; ++j) {
          if (s[j] == neg_inf) continue;
          acc_t pj = std::exp(s[j] - lse_i);                         // P_ij
          if (p > 0) {
            if (philox_bits(seed, offset, row + j) < threshold) continue;  // dropped
            pj *= keep_scale;                                        // P~_ij = P_ij / (1 - p)
          }
          for (int64_t c = 0; c < d.D; ++c) acc[c] += pj * (acc_t)vb[j * d.D + c];
        }
        for (int64_t c = 0; c < d.D; ++c) oi[c] = (scalar_t)acc[c];
      }
    }
  });
}

template <typename scalar_t>
static void attention_bwd_kernel(const scalar_t* dout, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                                 const scalar_t* out, const typename Acc<scalar_t>::type* lse, const bool* mask,
                                 scalar_t* dq, scalar_t* dk, scalar_t* dv, AttnDims d, double scale, double p,
                                 uint64_t seed, uint64_t offset) {
  using acc_t = typename Acc<scalar_t>::type;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const uint32_t threshold = dropout_threshold((float)p);
  const acc_t keep_scale = p > 0 ? (acc_t)(1.0 / (1.0 - p)) : (acc_t)1;
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dk_acc(d.Tk * d.D), dv_acc(d.Tk * d.D), dq_acc(d.D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H;
      const scalar_t* kb = k + bh * d.Tk * d.D;
      const scalar_t* vb = v + bh * d.Tk * d.D;
      const bool* mb = mask ? mask + b * d.Tk : nullptr;
      std::fill(dk_acc.begin(), dk_acc.end(), (acc_t)0);
      std::fill(dv_acc.begin(), dv_acc.end(), (acc_t)0);
      for (int64_t i = 0; i < d.Tq; ++i) {
        const int64_t row_i = bh * d.Tq + i;
        const scalar_t* qi = q + row_i * d.D;
        const scalar_t* doi = dout + row_i * d.D;
        scalar_t* dqi = dq + row_i * d.D;
        const acc_t lse_i = lse[row_i];
        if (lse_i == neg_inf) {                                      // empty row: no gradient
          for (int64_t c = 0; c < d.D; ++c) dqi[c] = (scalar_t)0;
          continue;
        }
        acc_t Di = 0;                                                // D_i = dO_i . O_i
        for (int64_t c = 0; c < d.D; ++c) Di += (acc_t)doi[c] * (acc_t)out[row_i * d.D + c];
        std::fill(dq_acc.begin(), dq_acc.end(), (acc_t)0);
        const uint64_t row = (uint64_t)row_i * (uint64_t)d.Tk;
        for (int64_t j = 0; j < d.Tk; ++j) {
          if (mb && !mb[j]) continue;                                // masked key: P_ij = 0
          const scalar_t* kj = kb + j * d.D;
          const scalar_t* vj = vb + j * d.D;
          acc_t dot = 0;
          for (int64_t c = 0; c < d.D; ++c) dot += (acc_t)qi[c] * (acc_t)kj[c];
          const acc_t pij = std::exp(dot * (acc_t)scale - lse_i);    // P_ij, recomputed
          acc_t mult = 1;                                            // keep_ij / (1 - p)
          if (p > 0) mult = philox_bits(seed, offset, row + j) < threshold ? (acc_t)0 : keep_scale;
          acc_t dpt = 0;                                             // dP~_ij = dO_i . v_j
          for (int64_t c = 0; c < d.D; ++c) dpt += (acc_t)doi[c] * (acc_t)vj[c];
          const acc_t ds = pij * (dpt * mult - Di);                  // dS_ij = P_ij (dP_ij - D_i)
          const acc_t pt = pij * mult;                               // P~_ij
          for (int64_t c = 0; c < d.D; ++c) {
            dv_acc[j * d.D + c] += pt * (acc_t)doi[c];               // dV_j += P~_ij dO_i
            dq_acc[c] += ds * (acc_t)kj[c];                          // dQ_i += dS_ij k_j
            dk_acc[j * d.D + c] += ds * (acc_t)qi[c];                // dK_j += dS_ij q_i
          }
        }
        for (int64_t c = 0; c < d.D; ++c) dqi[c] = (scalar_t)(dq_acc[c] * (acc_t)scale);
      }
      for (int64_t n = 0; n < d.Tk * d.D; ++n) {
        dk[bh * d.Tk * d.D + n] = (scalar_t)(dk_acc[n] * (acc_t)scale);
        dv[bh * d.Tk * d.D + n] = (scalar_t)dv_acc[n];
      }
    }
  });
}

static AttnDims attention_dims(const at::Tensor& q, const at::Tensor& k) {
  return AttnDims{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& mask, double dropout_p,
                                                     double scale, int64_t seed, int64_t offset) {
  check_attention_inputs(q, k, v, mask, dropout_p, at::kCPU);
  auto out = maybe_poison(at::empty_like(q));
  auto lse = maybe_poison(at::empty({q.size(0), q.size(1), q.size(2)},
                       q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat)));
  const bool* mptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cpu", [&] {
    attention_fwd_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), mptr,
                                   out.data_ptr<scalar_t>(), lse.data_ptr<typename Acc<scalar_t>::type>(),
                                   attention_dims(q, k), scale, dropout_p, (uint64_t)seed, (uint64_t)offset);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, double dropout_p, double scale, int64_t seed,
    int64_t offset) {
  check_attention_inputs(q, k, v, mask, dropout_p, at::kCPU);
  check_same_layout(dout, q, "dout", "q");
  check_same_layout(out, q, "out", "q");
  TORCH_CHECK(lse.is_contiguous() && lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
              "attention backward: expected a contiguous lse of shape ", q.sizes().slice(0, 3), ", got ", lse.sizes());
  auto dq = maybe_poison(at::empty_like(q)), dk = maybe_poison(at::empty_like(k)),
       dv = maybe_poison(at::empty_like(v));
  const bool* mptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cpu", [&] {
    attention_bwd_kernel<scalar_t>(dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                   v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                   lse.data_ptr<typename Acc<scalar_t>::type>(), mptr, dq.data_ptr<scalar_t>(),
                                   dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), attention_dims(q, k), scale,
                                   dropout_p, (uint64_t)seed, (uint64_t)offset);
  });
  return {dq, dk, dv};
}

// The keep mask the kernels draw, as a tensor (B, H, Tq, Tk): for tests and teaching only.
at::Tensor dropout_mask_cpu(const at::Tensor& like, int64_t B, int64_t H, int64_t Tq, int64_t Tk, double p,
                            int64_t seed, int64_t offset) {
  TORCH_CHECK(p >= 0 && p < 1, "dropout_mask: expected 0 <= p < 1, got ", p);
  TORCH_CHECK(B >= 0 && H >= 0 && Tq >= 0 && Tk >= 0, "dropout_mask: expected non-negative sizes");
  auto keep = at::empty({B, H, Tq, Tk}, like.options().dtype(at::kBool));
  bool* kp = keep.data_ptr<bool>();
  const uint32_t threshold = dropout_threshold((float)p);
  at::parallel_for(0, B * H * Tq * Tk, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) kp[n] = philox_bits((uint64_t)seed, (uint64_t)offset, (uint64_t)n) >= threshold;
  });
  return keep;
}

TORCH_LIBRARY_IMPL(minift, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

}  // namespace minift
