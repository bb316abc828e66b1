// Fused attention on the CPU: softmax(Q K^T * scale + mask) V without a T x T matrix.
//
// Forward, for each (batch, head) in parallel and each block of up to 64 query rows i:
//   s_ij = scale * q_i . k_j over kept keys j,  m_i = max_j s_ij,  lse_i = m_i + log sum_j exp(s_ij - m_i)
//   P_ij = exp(s_ij - lse_i),  P~_ij = P_ij * keep_ij / (1 - p)     (attention dropout, Philox bits)
//   o_i = sum_j P~_ij v_j
// It saves O and the row log-sum-exp L only. A row with no kept key gives o_i = 0, lse_i = -inf.
//
// Backward recomputes P_ij = exp(scale q_i.k_j - lse_i) and regenerates keep_ij from (seed, offset):
//   D_i = dO_i . O_i  (= sum_j P~_ij dP~_ij)
//   dV += P~^T dO,   dP_ij = (dO_i . v_j) * keep_ij / (1-p),   dS_ij = P_ij (dP_ij - D_i)
//   dQ = scale dS K,   dK += scale dS^T Q
// Masked keys are left out before any product (KeptKeys below), as if the sequence were shorter.
//
// How it is fast: the four products per block (Q K^T, P V; dO V^T and the three gradient
// products) are matrix multiplies, done by at::mm_out into a scratch block of (64 x Tk) scores
// that each thread reuses; only the softmax between them is written here, with SIMD row helpers
// (cpu_vec.h). The scratch is the only memory besides the inputs and outputs: nothing T x T.
// float32 and float64 compute in their own type; float16 and bfloat16 inputs are widened to
// float32 first and the results rounded back.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "checks.h"
#include "cpu_vec.h"
#include "philox.h"

namespace minift {

constexpr int64_t kQueryBlock = 64;

struct DropoutSpec {
  double p;
  uint64_t seed, offset;
};

// The keys each batch row attends to. Masked keys are left out of the products altogether, so they
// cost nothing and whatever their K and V hold (padding garbage, even NaN) cannot reach the output.
struct KeptKeys {
  std::vector<at::Tensor> index;      // per batch row: int64 positions of the kept keys
  std::vector<bool> all;              // per batch row: every key is kept (no gather needed)

  KeptKeys(const bool* mask, int64_t B, int64_t Tk) : index(B), all(B, true) {
    if (!mask) return;
    for (int64_t b = 0; b < B; ++b) {
      std::vector<int64_t> kept;
      for (int64_t j = 0; j < Tk; ++j)
        if (mask[b * Tk + j]) kept.push_back(j);
      all[b] = (int64_t)kept.size() == Tk;
      index[b] = at::tensor(kept, at::kLong);
    }
  }
  at::Tensor gather(const at::Tensor& t, int64_t b) const { return all[b] ? t : t.index_select(0, index[b]); }
  int64_t count(int64_t b, int64_t Tk) const { return all[b] ? Tk : index[b].numel(); }
};

// The dropout multipliers keep_ij / (1 - p) of query row i at the kept key positions: drawn for
// all Tk positions (element i * Tk + j of the Philox stream, as on the GPU), then picked.
template <typename T>
static void row_multipliers(T* mult, std::vector<T>& full, const KeptKeys& keys, int64_t b, uint64_t row,
                            int64_t Tk, DropoutSpec drop, uint32_t threshold, T keep_scale) {
  if (keys.all[b]) {
    dropout_multipliers(mult, drop.seed, drop.offset, row * (uint64_t)Tk, Tk, threshold, keep_scale);
    return;
  }
  dropout_multipliers(full.data(), drop.seed, drop.offset, row * (uint64_t)Tk, Tk, threshold, keep_scale);
  const int64_t* idx = keys.index[b].data_ptr<int64_t>();
  for (int64_t j = 0, n = keys.index[b].numel(); j < n; ++j) mult[j] = full[idx[j]];
}

template <typename T>
static void scale_row(T* row, int64_t n, T a) {
  for (int64_t j = 0; j < n; ++j) row[j] *= a;
}

template <typename T>
static void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask,
                                 at::Tensor& out, at::Tensor& lse, double scale_d, DropoutSpec drop) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  const T scale = (T)scale_d, neg_inf = -std::numeric_limits<T>::infinity();
  const uint32_t threshold = dropout_threshold((float)drop.p);
  const T keep_scale = drop.p > 0 ? (T)(1.0 / (1.0 - drop.p)) : (T)1;
  auto q3 = q.view({B * H, Tq, D}), k3 = k.view({B * H, Tk, D}), v3 = v.view({B * H, Tk, D});
  auto out3 = out.view({B * H, Tq, D});
  T* lse_p = lse.data_ptr<T>();
  const KeptKeys keys(mask, B, Tk);
  const int64_t block = std::min(Tq, kQueryBlock);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    auto scores = at::empty({block * Tk}, q.options());               // this thread's scratch
    std::vector<T> mult(Tk), full(Tk);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, nk = keys.count(b, Tk);
      if (nk == 0) {                                                    // no kept key: o_i = 0
        out3[bh].zero_();
        std::fill(lse_p + bh * Tq, lse_p + (bh + 1) * Tq, neg_inf);
        continue;
      }
      auto kb = keys.gather(k3[bh], b), vb = keys.gather(v3[bh], b);
      for (int64_t i0 = 0; i0 < Tq; i0 += block) {
        const int64_t n = std::min(block, Tq - i0);
        auto s = scores.narrow(0, 0, n * nk).view({n, nk});             // contiguous (n, nk)
        at::mm_out(s, q3[bh].narrow(0, i0, n), kb.t());                 // q_i . k_j
        T* sp = s.data_ptr<T>();
        for (int64_t r = 0; r < n; ++r) {
          T* row = sp + r * nk;
          const int64_t i = bh * Tq + i0 + r;
          scale_row(row, nk, scale);                                    // s_ij = scale q_i . k_j
          const T m = row_max(row, nk);
          const T l = row_exp_sum(row, row, nk, T(1), m);              // row_j = exp(s_ij - m_i)
          lse_p[i] = m + std::log(l);                                    // lse_i
          scale_row(row, nk, T(1) / l);                                  // P_ij
          if (drop.p > 0) {                                              // P~_ij = P_ij keep_ij / (1-p)
            row_multipliers(mult.data(), full, keys, b, (uint64_t)i, Tk, drop, threshold, keep_scale);
            for (int64_t j = 0; j < nk; ++j) row[j] *= mult[j];
          }
        }
        auto o = out3[bh].narrow(0, i0, n);
        at::mm_out(o, s, vb);                                            // o_i = sum_j P~_ij v_j
      }
    }
  });
}

template <typename T>
static void attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const bool* mask,
                                 at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, double scale_d, DropoutSpec drop) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  const T scale = (T)scale_d, neg_inf = -std::numeric_limits<T>::infinity();
  const uint32_t threshold = dropout_threshold((float)drop.p);
  const T keep_scale = drop.p > 0 ? (T)(1.0 / (1.0 - drop.p)) : (T)1;
  auto q3 = q.view({B * H, Tq, D}), k3 = k.view({B * H, Tk, D}), v3 = v.view({B * H, Tk, D});
  auto do3 = dout.view({B * H, Tq, D}), o3 = out.view({B * H, Tq, D});
  auto dq3 = dq.view({B * H, Tq, D}), dk3 = dk.view({B * H, Tk, D}), dv3 = dv.view({B * H, Tk, D});
  const T* lse_p = lse.data_ptr<T>();
  const KeptKeys keys(mask, B, Tk);
  const int64_t block = std::min(Tq, kQueryBlock);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    auto p_buf = at::empty({block * Tk}, q.options()), dp_buf = at::empty({block * Tk}, q.options());
    std::vector<T> mult(Tk, T(1)), full(Tk);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, nk = keys.count(b, Tk);
      if (nk == 0) {                                                    // no kept key: no gradient
        dq3[bh].zero_();
        dk3[bh].zero_();
        dv3[bh].zero_();
        continue;
      }
      auto kb = keys.gather(k3[bh], b), vb = keys.gather(v3[bh], b);
      // dK and dV of the kept keys: the outputs themselves when nothing is masked
      auto dkb = keys.all[b] ? dk3[bh] : at::empty({nk, D}, q.options());
      auto dvb = keys.all[b] ? dv3[bh] : at::empty({nk, D}, q.options());
      dkb.zero_();
      dvb.zero_();
      for (int64_t i0 = 0; i0 < Tq; i0 += block) {
        const int64_t n = std::min(block, Tq - i0);
        auto P = p_buf.narrow(0, 0, n * nk).view({n, nk}), dP = dp_buf.narrow(0, 0, n * nk).view({n, nk});
        auto qblk = q3[bh].narrow(0, i0, n), doblk = do3[bh].narrow(0, i0, n);
        at::mm_out(P, qblk, kb.t());                                     // q_i . k_j
        at::mm_out(dP, doblk, vb.t());                                   // dP~_ij = dO_i . v_j
        T* pp = P.data_ptr<T>();
        T* dpp = dP.data_ptr<T>();
        const T* dop = doblk.data_ptr<T>();
        const T* op = o3[bh].narrow(0, i0, n).data_ptr<T>();
        for (int64_t r = 0; r < n; ++r) {
          T* prow = pp + r * nk;
          T* dprow = dpp + r * nk;
          const int64_t i = bh * Tq + i0 + r;
          row_exp_sum(prow, prow, nk, scale, lse_p[i]);                  // P_ij = exp(s_ij - lse_i), recomputed
          const T Di = row_dot(dop + r * D, op + r * D, D);              // D_i = dO_i . O_i
          if (drop.p > 0)
            row_multipliers(mult.data(), full, keys, b, (uint64_t)i, Tk, drop, threshold, keep_scale);
          for (int64_t j = 0; j < nk; ++j) {
            const T pij = prow[j];
            dprow[j] = scale * pij * (dprow[j] * mult[j] - Di);          // scale dS_ij
            prow[j] = pij * mult[j];                                     // P~_ij
          }
        }
        dvb.addmm_(P.t(), doblk);                                        // dV += P~^T dO
        auto dqblk = dq3[bh].narrow(0, i0, n);
        at::mm_out(dqblk, dP, kb);                                       // dQ = scale dS K
        dkb.addmm_(dP.t(), qblk);                                        // dK += scale dS^T Q
      }
      if (!keys.all[b]) {                                                // scatter back; masked keys get 0
        dk3[bh].zero_().index_copy_(0, keys.index[b], dkb);
        dv3[bh].zero_().index_copy_(0, keys.index[b], dvb);
      }
    }
  });
}

static bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// float16/bfloat16 are computed in float32; float32/float64 as they are.
static at::Tensor widen(const at::Tensor& t) { return is_reduced(t) ? t.to(at::kFloat) : t; }

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& mask, double dropout_p,
                                                     double scale, int64_t seed, int64_t offset) {
  check_attention_inputs(q, k, v, mask, dropout_p, at::kCPU);
  at::AutoDispatchBelowADInplaceOrView below_autograd;   // the ATen calls inside are not differentiated
  auto qw = widen(q), kw = widen(k), vw = widen(v);
  auto out = maybe_poison(at::empty_like(qw));
  auto lse = maybe_poison(at::empty({q.size(0), q.size(1), q.size(2)}, qw.options()));
  const bool* mptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  DropoutSpec drop{dropout_p, (uint64_t)seed, (uint64_t)offset};
  AT_DISPATCH_FLOATING_TYPES(qw.scalar_type(), "attention_fwd_cpu", [&] {
    attention_fwd_kernel<scalar_t>(qw, kw, vw, mptr, out, lse, scale, drop);
  });
  return {is_reduced(q) ? out.to(q.scalar_type()) : out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, double dropout_p, double scale, int64_t seed,
    int64_t offset) {
  check_attention_inputs(q, k, v, mask, dropout_p, at::kCPU);
  check_same_layout(dout, q, "dout", "q");
  check_same_layout(out, q, "out", "q");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.is_contiguous() && lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2) && lse.scalar_type() == acc,
              "attention backward: expected a contiguous ", acc, " lse of shape ", q.sizes().slice(0, 3), ", got ",
              lse.scalar_type(), " ", lse.sizes());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto qw = widen(q), kw = widen(k), vw = widen(v), dow = widen(dout), ow = widen(out);
  auto dq = maybe_poison(at::empty_like(qw)), dk = maybe_poison(at::empty_like(kw)),
       dv = maybe_poison(at::empty_like(vw));
  const bool* mptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  DropoutSpec drop{dropout_p, (uint64_t)seed, (uint64_t)offset};
  AT_DISPATCH_FLOATING_TYPES(qw.scalar_type(), "attention_bwd_cpu", [&] {
    attention_bwd_kernel<scalar_t>(dow, qw, kw, vw, ow, lse, mptr, dq, dk, dv, scale, drop);
  });
  if (is_reduced(q)) return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
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
