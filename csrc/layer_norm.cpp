// The post-LN residual of BertSelfOutput and BertOutput on the CPU, fused: out = LayerNorm(dropout(y) + x).
//
// Forward, for each row n of H features in parallel (version 1: one pass to form z, one for the
// statistics, one to normalise, all in one row that stays in cache):
//   z_j = y_j keep_j / (1 - p) + x_j     (keep_j: the Philox bits of element n H + j, as dropout_fwd draws them)
//   mu = mean_j z_j,  r = 1 / sqrt(mean_j (z_j - mu)^2 + eps),  out_j = (z_j - mu) r w_j + b_j
// It saves z, mu and r (and the keep mask when p > 0) for the backward.
//
// Backward, per row, with g_j = dout_j w_j and xhat_j = (z_j - mu) r (the derivation is in
// minift/functional.py, add_layer_norm_backward):
//   dz_j = r (g_j - mean_k g_k - xhat_j mean_k g_k xhat_k),   dx = dz,   dy_j = dz_j keep_j / (1 - p)
//   dw_j = sum_n dout_nj xhat_nj,   db_j = sum_n dout_nj
// dx and dy are one tensor when p = 0 (the op then returns an empty dy). The column sums dw and db
// are taken in the same pass: each of kChunks fixed blocks of rows adds into its own partial row,
// and the partials are added in block order, so the result does not depend on the thread count.
// float64 computes in float64; float32, float16 and bfloat16 in float32 (z, mu and r are kept in
// float32), with a float32 row's statistics and normalisation in double (normalize_row_in_double).
// The inputs' dtypes may differ, as autocast makes them (a bfloat16 y, the float32 residual stream x
// and parameters): out takes the promoted dtype of y and x, as LayerNorm(dropout(y) + x) does in
// PyTorch. The backward op returns every gradient in the compute dtype; the autograd node
// (autograd.cpp) rounds each to its input's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_vec.h"
#include "philox.h"

namespace minift {

constexpr int64_t kChunks = 32;   // row blocks of the column sums (fixed: the sums do not depend on threads)

// sum_j (x_j - mu)^2
template <typename T>
static T row_sq_dev(const T* x, int64_t n, T mu) {
  const Vec<T> vm(mu);
  Vec<T> acc(T(0));
  int64_t j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
    const Vec<T> d = Vec<T>::loadu(x + j) - vm;
    acc = at::vec::fmadd(d, d, acc);
  }
  T s = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
  for (; j < n; ++j) s += (x[j] - mu) * (x[j] - mu);
  return s;
}

// TY: y's type, T or (under autocast, T = float) bfloat16/float16, read a row at a time as T.
// A float32 row's statistics and its normalisation in double, out rounded once at the end:
//   mu = mean z,  r = 1 / sqrt(mean (z - mu)^2 + eps),  out_j = (z_j - mu) r w_j + b_j
// Done in float32 (mu, then r, then three products and a sum, each rounded) the output carried 1.5x
// PyTorch's own error against float64 on MiniLM's rows (1.1e-6 against 7.8e-7), 2.2x with a float16
// y (1.4e-6 against 6.4e-7); in double it is within half an ulp of the exact function of z. Eight
// partial sums, so the loops vectorise.
static inline void normalize_row_in_double(const float* z, const float* w, const float* b, float* out, int64_t H,
                                           double eps, float& mean, float& rstd) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= H; j += 8)
    for (int k = 0; k < 8; ++k) lane[k] += (double)z[j + k];
  for (int k = 0; j < H; ++j, ++k) lane[k] += (double)z[j];
  const double mu = (((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))) / H;
  for (int k = 0; k < 8; ++k) lane[k] = 0;
  for (j = 0; j + 8 <= H; j += 8)
    for (int k = 0; k < 8; ++k) lane[k] += ((double)z[j + k] - mu) * ((double)z[j + k] - mu);
  for (int k = 0; j < H; ++j, ++k) lane[k] += ((double)z[j] - mu) * ((double)z[j] - mu);
  const double var = (((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))) / H;
  const double r = 1.0 / std::sqrt(var + eps);
  for (j = 0; j < H; ++j) out[j] = (float)(((double)z[j] - mu) * r * (double)w[j] + (double)b[j]);
  mean = (float)mu;
  rstd = (float)r;
}

template <typename T, typename TY>
static void add_layer_norm_fwd_kernel(const TY* y, const T* x, const T* w, const T* b, T* out, T* z, T* mean,
                                      T* rstd, bool* keep, int64_t N, int64_t H, T eps, double p, uint64_t seed,
                                      uint64_t offset) {
  const uint32_t threshold = dropout_threshold((float)p);
  const T keep_scale = p > 0 ? (T)(1.0 / (1.0 - p)) : T(1);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> mult(H);                                             // this thread's dropout multipliers
    std::vector<T> ybuf(std::is_same_v<T, TY> ? 0 : H);                 // y's row as T
    for (int64_t n = begin; n < end; ++n) {
      const T *yr = row_as<T>(y + n * H, ybuf.data(), H), *xr = x + n * H;
      T *zr = z + n * H, *orow = out + n * H;
      int64_t j = 0;
      if (p > 0) {
        for_each_keep(seed, offset, (uint64_t)(n * H), H, threshold, [&](int64_t k, bool kept) {
          keep[n * H + k] = kept;
          mult[k] = kept ? keep_scale : T(0);
        });
        for (; j + Vec<T>::size() <= H; j += Vec<T>::size())       // z = y keep / (1 - p) + x
          (Vec<T>::loadu(yr + j) * Vec<T>::loadu(mult.data() + j) + Vec<T>::loadu(xr + j)).store(zr + j);
        for (; j < H; ++j) zr[j] = yr[j] * mult[j] + xr[j];
      } else {
        for (; j + Vec<T>::size() <= H; j += Vec<T>::size())       // z = y + x
          (Vec<T>::loadu(yr + j) + Vec<T>::loadu(xr + j)).store(zr + j);
        for (; j < H; ++j) zr[j] = yr[j] + xr[j];
      }
      if constexpr (std::is_same_v<T, float>) {
        normalize_row_in_double(zr, w, b, orow, H, (double)eps, mean[n], rstd[n]);
        continue;
      }
      const T mu = row_sum(zr, H) / (T)H;                              // mu = mean z
      const T r = T(1) / std::sqrt(row_sq_dev(zr, H, mu) / (T)H + eps);  // r = 1 / sqrt(var z + eps)
      mean[n] = mu;
      rstd[n] = r;
      const Vec<T> vm(mu), vr(r);
      for (j = 0; j + Vec<T>::size() <= H; j += Vec<T>::size())     // out = (z - mu) r w + b
        ((Vec<T>::loadu(zr + j) - vm) * vr * Vec<T>::loadu(w + j) + Vec<T>::loadu(b + j)).store(orow + j);
      for (; j < H; ++j) orow[j] = (zr[j] - mu) * r * w[j] + b[j];
    }
  });
}

template <typename T>
static void add_layer_norm_bwd_kernel(const T* dout, const T* z, const T* w, const T* mean, const T* rstd,
                                      const bool* keep, T* dx, T* dy, T* dw, T* db, int64_t N, int64_t H, double p) {
  const T keep_scale = p > 0 ? (T)(1.0 / (1.0 - p)) : T(1);
  const int64_t chunks = std::min(kChunks, N), rows = (N + chunks - 1) / chunks;
  std::vector<T> partial(chunks * 2 * H, T(0));                       // per block: dw partial, db partial
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> g(H), xhat(H);
    for (int64_t c = c0; c < c1; ++c) {
      T *pw = partial.data() + c * 2 * H, *pb = pw + H;
      for (int64_t n = c * rows; n < std::min(N, (c + 1) * rows); ++n) {
        const T *dr = dout + n * H, *zr = z + n * H;
        const T mu = mean[n], r = rstd[n];
        const Vec<T> vm(mu), vr(r);
        Vec<T> sg(T(0)), sgx(T(0));
        int64_t j = 0;
        for (; j + Vec<T>::size() <= H; j += Vec<T>::size()) {
          const Vec<T> d = Vec<T>::loadu(dr + j), xh = (Vec<T>::loadu(zr + j) - vm) * vr;   // xhat = (z - mu) r
          const Vec<T> gj = d * Vec<T>::loadu(w + j);                                   // g = dout w
          gj.store(g.data() + j);
          xh.store(xhat.data() + j);
          sg = sg + gj;
          sgx = at::vec::fmadd(gj, xh, sgx);
          (Vec<T>::loadu(pw + j) + d * xh).store(pw + j);              // dw += dout xhat
          (Vec<T>::loadu(pb + j) + d).store(pb + j);                   // db += dout
        }
        auto add = [](Vec<T>& a, Vec<T>& b) { return a + b; };
        T sum_g = at::vec::vec_reduce_all<T>(add, sg), sum_gx = at::vec::vec_reduce_all<T>(add, sgx);
        for (; j < H; ++j) {
          const T xh = (zr[j] - mu) * r;
          g[j] = dr[j] * w[j];
          xhat[j] = xh;
          sum_g += g[j];
          sum_gx += g[j] * xh;
          pw[j] += dr[j] * xh;
          pb[j] += dr[j];
        }
        const T a = sum_g / (T)H, cc = sum_gx / (T)H;                // mean g, mean g xhat
        T* dxr = dx + n * H;
        const Vec<T> va(a), vc(cc);
        for (j = 0; j + Vec<T>::size() <= H; j += Vec<T>::size())    // dz = r (g - mean g - xhat mean(g xhat))
          (vr * (Vec<T>::loadu(g.data() + j) - va - Vec<T>::loadu(xhat.data() + j) * vc)).store(dxr + j);
        for (; j < H; ++j) dxr[j] = r * (g[j] - a - xhat[j] * cc);
        if (p > 0) {
          const bool* kr = keep + n * H;
          T* dyr = dy + n * H;
          for (j = 0; j < H; ++j) dyr[j] = kr[j] ? dxr[j] * keep_scale : T(0);   // dy = dz keep / (1 - p)
        }
      }
    }
  });
  for (int64_t j = 0; j < H; ++j) {                                   // the partials, in block order
    T sw = 0, sb = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      sw += partial[c * 2 * H + j];
      sb += partial[c * 2 * H + H + j];
    }
    dw[j] = sw;
    db[j] = sb;
  }
}

static void check_add_layer_norm_inputs(const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& bias, double p) {
  TORCH_CHECK(y.device().is_cpu(), "add_layer_norm: expected y on the CPU, got ", y.device());
  check_floating(y, "add_layer_norm y");
  TORCH_CHECK(y.dim() >= 1 && y.numel() > 0, "add_layer_norm: expected a non-empty y (..., H), got ", y.sizes());
  TORCH_CHECK(y.is_contiguous(), "add_layer_norm: expected a contiguous y (call .contiguous()), got strides ",
              y.strides());
  check_floating(x, "add_layer_norm x");
  TORCH_CHECK(x.sizes() == y.sizes() && x.device() == y.device() && x.is_contiguous(),
              "add_layer_norm: expected a contiguous x of y's shape ", y.sizes(), " on ", y.device(), ", got ",
              x.sizes(), " on ", x.device(), x.is_contiguous() ? "" : " (not contiguous)");
  const int64_t H = y.size(-1);
  for (auto [t, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == H && at::isFloatingType(t->scalar_type()) &&
                    t->scalar_type() == weight.scalar_type() && t->is_contiguous() && t->device() == y.device(),
                "add_layer_norm: expected a contiguous floating ", name, " of shape (", H, ",) on ", y.device(),
                ", weight and bias in one dtype, got ", t->sizes(), " ", t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(p >= 0 && p < 1, "add_layer_norm: expected 0 <= dropout_p < 1, got ", p);
}

// The dtypes may differ (autocast: a bfloat16 y, the float32 residual x, float32 parameters); the
// kernel computes in float32 (float64 if any input is float64), reading a bfloat16/float16 y row by
// row. Returns out (y's shape, in the promoted dtype of y and x, as LayerNorm(dropout(y) + x) in
// PyTorch), z, mean and rstd (in the compute dtype), keep (bool, y's shape; empty when p = 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cpu(
    const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps, double p,
    int64_t seed, int64_t offset) {
  check_add_layer_norm_inputs(y, x, weight, bias, p);
  at::AutoDispatchBelowADInplaceOrView below_autograd;                // converting here is not differentiated
  const int64_t H = y.size(-1), N = y.numel() / H;
  const auto C = compute_dtype({&y, &x, &weight, &bias});
  const bool rows_of_y = C == at::kFloat && is_reduced(y);            // y read and widened a row at a time
  auto yc = rows_of_y ? y : as_dtype(y, C);
  auto xc = as_dtype(x, C), wc = as_dtype(weight, C), bc = as_dtype(bias, C);
  auto out = maybe_poison(at::empty(y.sizes(), y.options().dtype(C))), z = maybe_poison(at::empty_like(out));
  auto rows = y.sizes().vec();
  rows.pop_back();
  auto mean = maybe_poison(at::empty(rows, out.options())), rstd = maybe_poison(at::empty(rows, out.options()));
  auto keep = p > 0 ? at::empty_like(y, y.options().dtype(at::kBool)) : at::empty({0}, y.options().dtype(at::kBool));
  auto run = [&](auto* y_ptr, auto* c_ptr) {
    using T = std::remove_pointer_t<decltype(c_ptr)>;
    add_layer_norm_fwd_kernel<T>(y_ptr, xc.data_ptr<T>(), wc.data_ptr<T>(), bc.data_ptr<T>(), out.data_ptr<T>(),
                                 z.data_ptr<T>(), mean.data_ptr<T>(), rstd.data_ptr<T>(),
                                 p > 0 ? keep.data_ptr<bool>() : nullptr, N, H, (T)eps, p, (uint64_t)seed,
                                 (uint64_t)offset);
  };
  if (rows_of_y) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(y.scalar_type(), "add_layer_norm_fwd_cpu",
                                       [&] { run(yc.data_ptr<scalar_t>(), (float*)nullptr); });
  } else {
    AT_DISPATCH_FLOATING_TYPES(C, "add_layer_norm_fwd_cpu", [&] { run(yc.data_ptr<scalar_t>(), (scalar_t*)nullptr); });
  }
  return {as_dtype(out, at::promote_types(y.scalar_type(), x.scalar_type())), z, mean, rstd, keep};
}

// dout in any floating dtype (out's); z, mean and rstd as the forward saved them. Returns dx, dy (empty
// when p = 0, where dy = dx), dweight and dbias, all in z's (the compute) dtype: the autograd node
// rounds each to its input's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& z, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& keep, double p) {
  TORCH_CHECK(dout.device().is_cpu(), "add_layer_norm backward: expected dout on the CPU, got ", dout.device());
  check_floating(dout, "add_layer_norm backward dout");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "add_layer_norm backward: expected z in float32 or float64 (the compute dtype), got ", z.scalar_type());
  TORCH_CHECK(dout.sizes() == z.sizes() && dout.is_contiguous() && z.is_contiguous(),
              "add_layer_norm backward: expected a contiguous dout of shape ", z.sizes(), ", got ", dout.sizes(),
              dout.is_contiguous() ? "" : " (not contiguous)");
  const int64_t H = z.size(-1), N = z.numel() / H;
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && at::isFloatingType(weight.scalar_type()),
              "add_layer_norm backward: expected a floating weight of shape (", H, ",), got ", weight.sizes(), " ",
              weight.scalar_type());
  TORCH_CHECK(mean.numel() == N && rstd.numel() == N && mean.scalar_type() == z.scalar_type() &&
                  rstd.scalar_type() == z.scalar_type(),
              "add_layer_norm backward: expected mean and rstd of ", N, " rows in ", z.scalar_type());
  TORCH_CHECK(p == 0 || (keep.scalar_type() == at::kBool && keep.sizes() == z.sizes() && keep.is_contiguous()),
              "add_layer_norm backward: expected a contiguous bool keep mask of shape ", z.sizes(), ", got ",
              keep.sizes(), " ", keep.scalar_type());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto C = z.scalar_type();
  auto dc = as_dtype(dout, C), wc = as_dtype(weight.contiguous(), C);
  auto dx = maybe_poison(at::empty_like(z)), dwt = maybe_poison(at::empty_like(wc));
  auto dbt = maybe_poison(at::empty_like(wc));
  auto dy = p > 0 ? maybe_poison(at::empty_like(z)) : at::empty({0}, z.options());
  AT_DISPATCH_FLOATING_TYPES(C, "add_layer_norm_bwd_cpu", [&] {
    add_layer_norm_bwd_kernel<scalar_t>(dc.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                                        mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
                                        p > 0 ? keep.data_ptr<bool>() : nullptr, dx.data_ptr<scalar_t>(),
                                        p > 0 ? dy.data_ptr<scalar_t>() : nullptr, dwt.data_ptr<scalar_t>(),
                                        dbt.data_ptr<scalar_t>(), N, H, p);
  });
  return {dx, dy, dwt, dbt};
}

TORCH_LIBRARY_IMPL(minift, CPU, m) {
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_cpu);
  m.impl("add_layer_norm_bwd", &add_layer_norm_bwd_cpu);
}

}  // namespace minift
