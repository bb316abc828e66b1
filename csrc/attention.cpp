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
// How it is fast: the products per block (Q K^T and P V forward; Q K^T, dO V^T and the three
// gradient products backward) are BLAS matrix multiplies (cpu_gemm.h) into a scratch block of
// (64 x Tk) scores that each thread reuses; only the softmax between them is written here, with
// SIMD row helpers (cpu_vec.h). No ATen call inside the loops: at BERT's short sentences a block is
// so small that dispatch would cost more than the arithmetic. The scratch is the only memory
// besides the inputs and outputs: nothing T x T.
// The layout: Q, K, V, O and their gradients are (B, H, T, D) tensors whose rows of D numbers are
// contiguous, at any strides otherwise (Rows below). The model hands over the projections' output
// (B, T, H*D) viewed per head, so no transposing copy is made on the way in, O is written in the
// (B, T, H, D) order the output projection reads, and dQ, dK, dV in the order of the projections'
// outputs. float32 and float64 compute in their own type; float16 and bfloat16 inputs are widened
// to float32 first and the results rounded back.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_gemm.h"
#include "cpu_vec.h"
#include "philox.h"

namespace minift {

constexpr int64_t kQueryBlock = 64;

struct AttnDims {
  int64_t B, H, Tq, Tk, D;
};

struct DropoutSpec {
  double p;
  uint64_t seed, offset;
};

// A (B, H, T, D) tensor with contiguous rows of D: row t of head h of batch row b starts at
// data + b sB + h sH + t sT. For the projections' output (B, T, H*D) viewed per head, sT = H*D.
// Packed (start set): a (N, H, D) tensor holding the batch rows' tokens one after another, batch
// row b's from row start[b] on: data + (start[b] + t) sT + h sH.
template <typename T>
struct Rows {
  T* data;
  int64_t sB, sH, sT;
  const int64_t* start = nullptr;
  T* at(int64_t b, int64_t h) const { return data + (start ? start[b] * sT : b * sB) + h * sH; }
};

template <typename T>
static Rows<T> rows_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
static Rows<T> packed_rows_of(const at::Tensor& t, const int64_t* start) {
  return {t.data_ptr<T>(), 0, t.stride(1), t.stride(0), start};
}

// Which rows each batch row has. Padded: Tq query rows and Tk keys (some masked) per batch row,
// lse (B, H, Tq). Packed: batch row b has cu_q[b+1] - cu_q[b] queries and cu_k[b+1] - cu_k[b]
// keys, all kept, lse (H, Nq); Tq and Tk are then the padded lengths the tokens came from. Either
// way query row i of (b, h) draws the dropout bits of row (b H + h) Tq + i, element j of it at
// ((b H + h) Tq + i) Tk + j: a right-padded batch packed draws the bits it draws padded.
struct Seqs {
  const int64_t* cu_q = nullptr;   // null: padded
  const int64_t* cu_k = nullptr;
  int64_t Nq = 0;
  int64_t q_rows(int64_t b, int64_t Tq) const { return cu_q ? cu_q[b + 1] - cu_q[b] : Tq; }
  int64_t k_rows(int64_t b, int64_t Tk) const { return cu_k ? cu_k[b + 1] - cu_k[b] : Tk; }
  template <typename T>
  T* lse_at(T* lse, int64_t b, int64_t h, int64_t H, int64_t Tq) const {
    return cu_q ? lse + h * Nq + cu_q[b] : lse + (b * H + h) * Tq;
  }
};

// n rows of D numbers, ld apart, set to 0
template <typename T>
static void zero_rows(T* x, int64_t n, int64_t ld, int64_t D) {
  for (int64_t r = 0; r < n; ++r) std::fill(x + r * ld, x + r * ld + D, T(0));
}

// The keys each batch row attends to. Masked keys are left out of the products altogether, so they
// cost nothing and whatever their K and V hold (padding garbage, even NaN) cannot reach the output.
// A right-padded row (the kept keys are 0 .. n-1, the usual case) needs no copy at all: its kept
// rows of K and V are the first n, and its dropout bits the first n of each query row's run.
struct KeptKeys {
  std::vector<std::vector<int64_t>> index;   // per batch row: positions of the kept keys
  std::vector<bool> prefix;                  // per batch row: the kept keys are 0 .. n-1 (all of them, or a prefix)

  KeptKeys(const bool* mask, int64_t B, int64_t Tk, const Seqs& seqs) : index(B), prefix(B, true) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = seqs.k_rows(b, Tk);                 // packed: every key of the row is kept
      for (int64_t j = 0; j < n; ++j)
        if (!mask || mask[b * Tk + j]) index[b].push_back(j);
      prefix[b] = index[b].empty() || index[b].back() + 1 == (int64_t)index[b].size();
    }
  }
  int64_t count(int64_t b) const { return (int64_t)index[b].size(); }
  // one past the last kept key: the keys' dropout bits a query row needs are the first span(b) of its Tk
  int64_t span(int64_t b) const { return index[b].empty() ? 0 : index[b].back() + 1; }
  // The rows of x (Tk rows of D, ld apart) at the kept keys: x itself (their first count(b) rows,
  // ld apart), or a copy packed into buf (D apart). Returns the rows and their distance.
  template <typename T>
  std::pair<const T*, int64_t> gather(const T* x, int64_t ld, int64_t b, int64_t D, std::vector<T>& buf) const {
    if (prefix[b]) return {x, ld};
    for (size_t r = 0; r < index[b].size(); ++r) std::copy_n(x + index[b][r] * ld, D, buf.data() + r * D);
    return {buf.data(), D};
  }
};

// The dropout multipliers keep_ij / (1 - p) of query row i at the kept key positions: element
// i * Tk + j of the Philox stream (as on the GPU), drawn only up to the last kept key, then picked.
template <typename T>
static void row_multipliers(T* mult, std::vector<T>& full, const KeptKeys& keys, int64_t b, uint64_t row,
                            int64_t Tk, DropoutSpec drop, uint32_t threshold, T keep_scale) {
  if (keys.prefix[b]) {
    dropout_multipliers(mult, drop.seed, drop.offset, row * (uint64_t)Tk, keys.count(b), threshold, keep_scale);
    return;
  }
  dropout_multipliers(full.data(), drop.seed, drop.offset, row * (uint64_t)Tk, keys.span(b), threshold, keep_scale);
  for (size_t j = 0; j < keys.index[b].size(); ++j) mult[j] = full[keys.index[b][j]];
}

template <typename T>
static void scale_row(T* row, int64_t n, T a) {
  for (int64_t j = 0; j < n; ++j) row[j] *= a;
}

template <typename T>
static void attention_fwd_kernel(Rows<T> q, Rows<T> k, Rows<T> v, const bool* mask, Rows<T> out, T* lse, AttnDims d,
                                 double scale_d, DropoutSpec drop, Seqs seqs = {}) {
  const int64_t Tq = d.Tq, Tk = d.Tk, D = d.D;
  const T scale = (T)scale_d, neg_inf = -std::numeric_limits<T>::infinity();
  const uint32_t threshold = dropout_threshold((float)drop.p);
  const T keep_scale = drop.p > 0 ? (T)(1.0 / (1.0 - drop.p)) : (T)1;
  const KeptKeys keys(mask, d.B, Tk, seqs);
  const int64_t block = std::min(Tq, kQueryBlock);
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(block * Tk), mult(Tk), full(Tk), kbuf(Tk * D), vbuf(Tk * D);   // this thread's scratch
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H, nk = keys.count(b), nq = seqs.q_rows(b, Tq);
      const T* qb = q.at(b, h);
      T* ob = out.at(b, h);
      T* lse_b = seqs.lse_at(lse, b, h, d.H, Tq);
      if (nk == 0) {                                                    // no kept key: o_i = 0
        zero_rows(ob, nq, out.sT, D);
        std::fill(lse_b, lse_b + nq, neg_inf);
        continue;
      }
      const auto [kb, ldk] = keys.gather<T>(k.at(b, h), k.sT, b, D, kbuf);
      const auto [vb, ldv] = keys.gather<T>(v.at(b, h), v.sT, b, D, vbuf);
      for (int64_t i0 = 0; i0 < nq; i0 += block) {
        const int64_t n = std::min(block, nq - i0);
        T* s = scores.data();                                           // (n, nk)
        gemm<T>(false, true, n, nk, D, scale, qb + i0 * q.sT, q.sT, kb, ldk, T(0), s, nk);  // s_ij = scale q_i . k_j
        for (int64_t r = 0; r < n; ++r) {
          T* row = s + r * nk;
          const T m = row_max(row, nk);
          const T l = row_exp_sum(row, row, nk, m);                    // row_j = exp(s_ij - m_i)
          lse_b[i0 + r] = m + std::log(l);                               // lse_i
          scale_row(row, nk, T(1) / l);                                  // P_ij
          if (drop.p > 0) {                                              // P~_ij = P_ij keep_ij / (1-p)
            const uint64_t i = (uint64_t)(bh * Tq + i0 + r);             // the bits' row
            row_multipliers(mult.data(), full, keys, b, i, Tk, drop, threshold, keep_scale);
            for (int64_t j = 0; j < nk; ++j) row[j] *= mult[j];
          }
        }
        gemm<T>(false, false, n, D, nk, T(1), s, nk, vb, ldv, T(0), ob + i0 * out.sT, out.sT);   // o_i = sum_j P~_ij v_j
      }
    }
  });
}

template <typename T>
static void attention_bwd_kernel(Rows<T> dout, Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> out, const T* lse,
                                 const bool* mask, Rows<T> dq, Rows<T> dk, Rows<T> dv, AttnDims d, double scale_d,
                                 DropoutSpec drop, Seqs seqs = {}) {
  const int64_t Tq = d.Tq, Tk = d.Tk, D = d.D;
  const T scale = (T)scale_d;
  const uint32_t threshold = dropout_threshold((float)drop.p);
  const T keep_scale = drop.p > 0 ? (T)(1.0 / (1.0 - drop.p)) : (T)1;
  const KeptKeys keys(mask, d.B, Tk, seqs);
  const int64_t block = std::min(Tq, kQueryBlock);
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p_buf(block * Tk), dp_buf(block * Tk), mult(Tk, T(1)), full(Tk);
    std::vector<T> kbuf(Tk * D), vbuf(Tk * D), dk_acc(Tk * D), dv_acc(Tk * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H, nk = keys.count(b), nq = seqs.q_rows(b, Tq), nkr = seqs.k_rows(b, Tk);
      const T *qb = q.at(b, h), *dob = dout.at(b, h), *ob = out.at(b, h);
      const T* lse_b = seqs.lse_at(lse, b, h, d.H, Tq);
      T *dqb = dq.at(b, h), *dkb = dk.at(b, h), *dvb = dv.at(b, h);
      if (nk == 0) {                                                    // no kept key: no gradient
        zero_rows(dqb, nq, dq.sT, D);
        zero_rows(dkb, nkr, dk.sT, D);
        zero_rows(dvb, nkr, dv.sT, D);
        continue;
      }
      const auto [kb, ldk] = keys.gather<T>(k.at(b, h), k.sT, b, D, kbuf);
      const auto [vb, ldv] = keys.gather<T>(v.at(b, h), v.sT, b, D, vbuf);
      // dK and dV of the kept keys: straight into the outputs' first rows when they are a prefix
      const bool direct = keys.prefix[b];
      T* dk_kept = direct ? dkb : dk_acc.data();
      T* dv_kept = direct ? dvb : dv_acc.data();
      const int64_t lddk = direct ? dk.sT : D, lddv = direct ? dv.sT : D;
      zero_rows(dk_kept, nk, lddk, D);
      zero_rows(dv_kept, nk, lddv, D);
      for (int64_t i0 = 0; i0 < nq; i0 += block) {
        const int64_t n = std::min(block, nq - i0);
        const T* qi = qb + i0 * q.sT;
        const T* doi = dob + i0 * dout.sT;
        T* P = p_buf.data();                                            // (n, nk)
        T* dP = dp_buf.data();                                          // (n, nk)
        gemm<T>(false, true, n, nk, D, scale, qi, q.sT, kb, ldk, T(0), P, nk);       // s_ij
        gemm<T>(false, true, n, nk, D, T(1), doi, dout.sT, vb, ldv, T(0), dP, nk);   // dP~_ij = dO_i . v_j
        for (int64_t r = 0; r < n; ++r) {
          T* prow = P + r * nk;
          T* dprow = dP + r * nk;
          row_exp_sum(prow, prow, nk, lse_b[i0 + r]);                    // P_ij = exp(s_ij - lse_i), recomputed
          const T Di = row_dot(doi + r * dout.sT, ob + (i0 + r) * out.sT, D);  // D_i = dO_i . O_i
          if (drop.p > 0)
            row_multipliers(mult.data(), full, keys, b, (uint64_t)(bh * Tq + i0 + r), Tk, drop, threshold, keep_scale);
          for (int64_t j = 0; j < nk; ++j) {
            const T pij = prow[j];
            dprow[j] = scale * pij * (dprow[j] * mult[j] - Di);          // scale dS_ij
            prow[j] = pij * mult[j];                                     // P~_ij
          }
        }
        gemm<T>(true, false, nk, D, n, T(1), P, nk, doi, dout.sT, T(1), dv_kept, lddv);   // dV += P~^T dO
        gemm<T>(false, false, n, D, nk, T(1), dP, nk, kb, ldk, T(0), dqb + i0 * dq.sT, dq.sT);  // dQ = scale dS K
        gemm<T>(true, false, nk, D, n, T(1), dP, nk, qi, q.sT, T(1), dk_kept, lddk);      // dK += scale dS^T Q
      }
      if (direct) {                                                      // masked keys (the tail) get 0
        zero_rows(dkb + nk * dk.sT, nkr - nk, dk.sT, D);
        zero_rows(dvb + nk * dv.sT, nkr - nk, dv.sT, D);
      } else {                                                           // scatter back; masked keys get 0
        zero_rows(dkb, nkr, dk.sT, D);
        zero_rows(dvb, nkr, dv.sT, D);
        for (int64_t r = 0; r < nk; ++r) {
          std::copy_n(dk_kept + r * D, D, dkb + keys.index[b][r] * dk.sT);
          std::copy_n(dv_kept + r * D, D, dvb + keys.index[b][r] * dv.sT);
        }
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
  at::AutoDispatchBelowADInplaceOrView below_autograd;   // widening and copies here are not differentiated
  auto qw = widen(q), kw = widen(k), vw = widen(v);
  auto out = maybe_poison(at::empty_like(qw));
  auto lse = maybe_poison(at::empty({q.size(0), q.size(1), q.size(2)}, qw.options()));
  const bool* mptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  DropoutSpec drop{dropout_p, (uint64_t)seed, (uint64_t)offset};
  AT_DISPATCH_FLOATING_TYPES(qw.scalar_type(), "attention_fwd_cpu", [&] {
    attention_fwd_kernel<scalar_t>(rows_of<scalar_t>(qw), rows_of<scalar_t>(kw), rows_of<scalar_t>(vw), mptr,
                                   rows_of<scalar_t>(out), lse.data_ptr<scalar_t>(), attention_dims(q, k), scale,
                                   drop);
  });
  return {is_reduced(q) ? out.to(q.scalar_type()) : out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, double dropout_p, double scale, int64_t seed,
    int64_t offset) {
  check_attention_inputs(q, k, v, mask, dropout_p, at::kCPU);
  check_like(dout, q, "attention dout", "q", at::kCPU);
  check_like(out, q, "attention out", "q", at::kCPU);
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
    attention_bwd_kernel<scalar_t>(rows_of<scalar_t>(dow), rows_of<scalar_t>(qw), rows_of<scalar_t>(kw),
                                   rows_of<scalar_t>(vw), rows_of<scalar_t>(ow), lse.data_ptr<scalar_t>(), mptr,
                                   rows_of<scalar_t>(dq), rows_of<scalar_t>(dk), rows_of<scalar_t>(dv),
                                   attention_dims(q, k), scale, drop);
  });
  if (is_reduced(q)) return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
  return {dq, dk, dv};
}

// Packed attention: the tokens of B sequences one after another with no padding, q (Nq, H, D),
// k and v (Nk, H, D), batch row b's at rows cu_q[b] .. cu_q[b+1]-1 (cu_k for keys); every key
// is kept. Tq and Tk: the padded lengths the rows came from (they number the dropout bits, see Seqs).
static void check_packed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                         const at::Tensor& cu_k, int64_t Tq, int64_t Tk, double dropout_p) {
  for (const auto* t : {&q, &k, &v, &cu_q, &cu_k})
    TORCH_CHECK(t->device().is_cpu(), "attention_packed: expected every tensor on the CPU, got one on ", t->device());
  TORCH_CHECK(q.dim() == 3, "attention_packed: expected q of shape (Nq, H, D), got ", q.sizes());
  check_floating(q, "attention_packed q");
  TORCH_CHECK(k.dim() == 3 && k.size(1) == q.size(1) && k.size(2) == q.size(2),
              "attention_packed: expected k of shape (Nk, ", q.size(1), ", ", q.size(2), "), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "attention_packed: expected v of k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention_packed: expected q, k, v of one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(attention_layout_ok(*t, at::kCPU),
                "attention_packed: expected rows of D contiguous (last stride 1), got strides ", t->strides());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention_packed: expected 0 <= dropout_p < 1, got ", dropout_p);
  TORCH_CHECK(Tq >= 1 && Tk >= 1, "attention_packed: expected padded lengths Tq, Tk >= 1, got ", Tq, ", ", Tk);
  const std::pair<const at::Tensor*, int64_t> cus[] = {{&cu_q, q.size(0)}, {&cu_k, k.size(0)}};
  for (int w = 0; w < 2; ++w) {
    const at::Tensor& cu = *cus[w].first;
    const char* name = w == 0 ? "cu_q" : "cu_k";
    const int64_t N = cus[w].second, T = w == 0 ? Tq : Tk;
    TORCH_CHECK(cu.scalar_type() == at::kLong && cu.dim() == 1 && cu.is_contiguous() && cu.numel() >= 2,
                "attention_packed: expected ", name, " a contiguous int64 vector of B + 1 offsets, got ",
                cu.scalar_type(), " ", cu.sizes());
    TORCH_CHECK(cu.numel() == cu_q.numel(), "attention_packed: expected cu_q and cu_k of one length, got ",
                cu_q.numel(), " and ", cu.numel());
    const int64_t* c = cu.data_ptr<int64_t>();
    TORCH_CHECK(c[0] == 0 && c[cu.numel() - 1] == N, "attention_packed: expected ", name, " from 0 to ", N,
                " (the rows of ", w == 0 ? "q" : "k", "), got ", c[0], " to ", c[cu.numel() - 1]);
    for (int64_t b = 0; b + 1 < cu.numel(); ++b)
      TORCH_CHECK(c[b + 1] >= c[b] && c[b + 1] - c[b] <= T, "attention_packed: expected batch row ", b,
                  " to have 0 to ", T, " rows (", name, "), got ", c[b + 1] - c[b]);
  }
}

// What both packed ops hand the kernels: the row offsets, the sizes and the dropout stream.
struct PackedCall {
  Seqs seqs;
  AttnDims dims;
  DropoutSpec drop;
  PackedCall(const at::Tensor& q, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t Tq, int64_t Tk,
             double dropout_p, int64_t seed, int64_t offset)
      : seqs{cu_q.data_ptr<int64_t>(), cu_k.data_ptr<int64_t>(), q.size(0)},
        dims{cu_q.numel() - 1, q.size(1), Tq, Tk, q.size(2)},
        drop{dropout_p, (uint64_t)seed, (uint64_t)offset} {}
};

std::tuple<at::Tensor, at::Tensor> attention_packed_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_q,
                                                            const at::Tensor& cu_k, int64_t Tq, int64_t Tk,
                                                            double dropout_p, double scale, int64_t seed,
                                                            int64_t offset) {
  check_packed(q, k, v, cu_q, cu_k, Tq, Tk, dropout_p);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto qw = widen(q), kw = widen(k), vw = widen(v);
  auto out = maybe_poison(at::empty_like(qw));
  auto lse = maybe_poison(at::empty({q.size(1), q.size(0)}, qw.options()));     // (H, Nq)
  const PackedCall c(q, cu_q, cu_k, Tq, Tk, dropout_p, seed, offset);
  const int64_t *cq = c.seqs.cu_q, *ck = c.seqs.cu_k;
  AT_DISPATCH_FLOATING_TYPES(qw.scalar_type(), "attention_packed_fwd_cpu", [&] {
    attention_fwd_kernel<scalar_t>(packed_rows_of<scalar_t>(qw, cq), packed_rows_of<scalar_t>(kw, ck),
                                   packed_rows_of<scalar_t>(vw, ck), nullptr, packed_rows_of<scalar_t>(out, cq),
                                   lse.data_ptr<scalar_t>(), c.dims, scale, c.drop, c.seqs);
  });
  return {is_reduced(q) ? out.to(q.scalar_type()) : out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_packed_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t Tq, int64_t Tk, double dropout_p,
    double scale, int64_t seed, int64_t offset) {
  check_packed(q, k, v, cu_q, cu_k, Tq, Tk, dropout_p);
  for (const auto* t : {&dout, &out})
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() && t->device().is_cpu() &&
                    attention_layout_ok(*t, at::kCPU),
                "attention_packed backward: expected dout and out like q (", q.sizes(), ", ", q.scalar_type(),
                ", rows of D contiguous), got ", t->sizes(), ", ", t->scalar_type(), ", strides ", t->strides());
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.is_contiguous() && lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0) &&
                  lse.scalar_type() == acc,
              "attention_packed backward: expected a contiguous ", acc, " lse of shape (", q.size(1), ", ", q.size(0),
              "), got ", lse.scalar_type(), " ", lse.sizes());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto qw = widen(q), kw = widen(k), vw = widen(v), dow = widen(dout), ow = widen(out);
  auto dq = maybe_poison(at::empty_like(qw)), dk = maybe_poison(at::empty_like(kw)),
       dv = maybe_poison(at::empty_like(vw));
  const PackedCall c(q, cu_q, cu_k, Tq, Tk, dropout_p, seed, offset);
  const int64_t *cq = c.seqs.cu_q, *ck = c.seqs.cu_k;
  AT_DISPATCH_FLOATING_TYPES(qw.scalar_type(), "attention_packed_bwd_cpu", [&] {
    attention_bwd_kernel<scalar_t>(packed_rows_of<scalar_t>(dow, cq), packed_rows_of<scalar_t>(qw, cq),
                                   packed_rows_of<scalar_t>(kw, ck), packed_rows_of<scalar_t>(vw, ck),
                                   packed_rows_of<scalar_t>(ow, cq), lse.data_ptr<scalar_t>(), nullptr,
                                   packed_rows_of<scalar_t>(dq, cq), packed_rows_of<scalar_t>(dk, ck),
                                   packed_rows_of<scalar_t>(dv, ck), c.dims, scale, c.drop, c.seqs);
  });
  if (is_reduced(q)) return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(minift, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("attention_packed_fwd", &attention_packed_fwd_cpu);
  m.impl("attention_packed_bwd", &attention_packed_bwd_cpu);
}

}  // namespace minift
