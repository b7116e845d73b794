// Every CPU kernel against a naive double-precision loop, on random awkward shapes, reached
// through the dispatcher exactly as Python reaches it. Run under ASan/UBSan in CI.
#include "test_harness.h"

#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

namespace {

using LayerNormForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    double, std::optional<at::ScalarType>);
using LayerNormBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, std::optional<at::ScalarType>);

// naive codes of v (n values, stride s) with scale absmax/127; returns the scale
float naive_codes(const float* v, int64_t n, int64_t s, int8_t* out, int64_t os) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(v[i * s]));
  const float scale = amax / 127.0f;
  const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float q = std::nearbyint(v[i * s] * inv);
    out[i * os] = static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, q)));
  }
  return scale;
}

// Naive add + LayerNorm forward and backward over rows of length C, in double.
void naive_add_layer_norm(const at::Tensor& x, const at::Tensor& r, const at::Tensor& w,
                          const at::Tensor& b, const at::Tensor& dy, const at::Tensor& dsum,
                          double eps, at::Tensor& out, at::Tensor& sum, at::Tensor& dx,
                          at::Tensor& dw, at::Tensor& db) {
  const int64_t C = x.size(-1), N = x.numel() / C;
  auto X = x.reshape({N, C}).to(at::kDouble), R = r.reshape({N, C}).to(at::kDouble);
  auto DY = dy.reshape({N, C}).to(at::kDouble), DS = dsum.reshape({N, C}).to(at::kDouble);
  auto W = w.to(at::kDouble), B = b.to(at::kDouble);
  out = at::empty({N, C}, at::kDouble);
  sum = at::empty({N, C}, at::kDouble);
  dx = at::empty({N, C}, at::kDouble);
  dw = at::zeros({C}, at::kDouble);
  db = at::zeros({C}, at::kDouble);
  auto xa = X.accessor<double, 2>(), ra = R.accessor<double, 2>(), dya = DY.accessor<double, 2>();
  auto dsa = DS.accessor<double, 2>();
  auto wa = W.accessor<double, 1>(), ba = B.accessor<double, 1>();
  auto oa = out.accessor<double, 2>(), sa = sum.accessor<double, 2>(), dxa = dx.accessor<double, 2>();
  auto dwa = dw.accessor<double, 1>(), dba = db.accessor<double, 1>();
  for (int64_t i = 0; i < N; ++i) {
    double mean = 0, var = 0;
    for (int64_t c = 0; c < C; ++c) mean += (sa[i][c] = xa[i][c] + ra[i][c]);
    mean /= C;
    for (int64_t c = 0; c < C; ++c) var += (sa[i][c] - mean) * (sa[i][c] - mean);
    const double rstd = 1.0 / std::sqrt(var / C + eps);
    double mg = 0, mgx = 0;
    for (int64_t c = 0; c < C; ++c) {
      const double xh = (sa[i][c] - mean) * rstd;
      oa[i][c] = xh * wa[c] + ba[c];
      dwa[c] += dya[i][c] * xh;
      dba[c] += dya[i][c];
      mg += dya[i][c] * wa[c];
      mgx += dya[i][c] * wa[c] * xh;
    }
    mg /= C;
    mgx /= C;
    for (int64_t c = 0; c < C; ++c) {
      const double xh = (sa[i][c] - mean) * rstd;
      dxa[i][c] = rstd * (dya[i][c] * wa[c] - mg - xh * mgx) + dsa[i][c];
    }
  }
}

TEST_CASE(add_layer_norm_matches_naive_loop) {
  auto fwd = harness::op<LayerNormForward>("ryzen_llm::add_layer_norm_forward");
  auto bwd = harness::op<LayerNormBackward>("ryzen_llm::add_layer_norm_backward");
  at::manual_seed(0);
  const std::vector<std::vector<int64_t>> shapes = {{1, 1}, {3, 7}, {97, 48}, {2, 5, 129}, {64, 512}};
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kDouble}) {
    const double tol = dtype == at::kBFloat16 ? 6e-2 : (dtype == at::kFloat ? 2e-4 : 1e-10);
    for (const auto& shape : shapes) {
      auto opts = at::TensorOptions().dtype(dtype);
      const int64_t C = shape.back();
      auto x = at::randn(shape, opts), r = at::randn(shape, opts);
      auto w = at::randn({C}, opts), b = at::randn({C}, opts);
      auto dy = at::randn(shape, opts), ds = at::randn(shape, opts);
      auto [out, sum, mean, rstd] = fwd.call(x, r, w, b, 1e-5, std::nullopt);
      auto [dx, dw, db, dr] = bwd.call(dy, ds, sum, w, mean, rstd, std::nullopt);
      EXPECT(dr.numel() == 0, "grad_residual is empty when the residual has input's dtype");
      at::Tensor e_out, e_sum, e_dx, e_dw, e_db;
      naive_add_layer_norm(x, r, w, b, dy, ds, 1e-5, e_out, e_sum, e_dx, e_dw, e_db);
      const int64_t N = x.numel() / C;
      // bf16 rows: the error of one rounding of O(1) values times the row's scale.
      const double scale_w = 1 + std::sqrt(static_cast<double>(N));
      EXPECT(harness::max_abs_diff(out.reshape({N, C}), e_out) < tol * 4, "out dtype %s C %ld",
            c10::toString(dtype), (long)C);
      EXPECT(harness::max_abs_diff(sum.reshape({N, C}), e_sum) < tol * 2, "sum");
      EXPECT(harness::max_abs_diff(dx.reshape({N, C}), e_dx) < tol * 8, "grad_input dtype %s C %ld",
            c10::toString(dtype), (long)C);
      EXPECT(harness::max_abs_diff(dw, e_dw) < tol * 8 * scale_w, "grad_weight");
      EXPECT(harness::max_abs_diff(db, e_db) < tol * 8 * scale_w, "grad_bias");
    }
  }
}

// add_layer_norm_int8_forward: add_layer_norm_forward's outputs bit for bit, and the int8 row
// codes of out against a naive absmax/round loop over out's stored values.
TEST_CASE(add_layer_norm_int8_writes_the_row_codes_of_its_output) {
  using Fwd6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double,
      std::optional<at::ScalarType>);
  auto fwd = harness::op<LayerNormForward>("ryzen_llm::add_layer_norm_forward");
  auto fwd8 = harness::op<Fwd6>("ryzen_llm::add_layer_norm_int8_forward");
  at::manual_seed(15);
  const std::vector<std::vector<int64_t>> shapes = {{1, 1}, {3, 7}, {97, 48}, {2, 5, 129}, {40, 512}};
  for (auto out_type : {at::kFloat, at::kBFloat16}) {
    for (const auto& shape : shapes) {
      const int64_t C = shape.back();
      auto x = at::randn(shape), r = at::randn(shape).to(out_type), w = at::randn({C}), b = at::randn({C});
      auto [out, sum, mean, rstd] = fwd.call(x, r, w, b, 1e-5, out_type);
      auto [out8, sum8, mean8, rstd8, codes, scales] = fwd8.call(x, r, w, b, 1e-5, out_type);
      EXPECT(at::equal(out, out8) && at::equal(sum, sum8) && at::equal(mean, mean8) && at::equal(rstd, rstd8),
             "outputs C %ld", (long)C);
      const int64_t N = x.numel() / C;
      auto of = out.to(at::kFloat).reshape({N, C}).contiguous();
      auto expect = at::empty({N, C}, at::kChar);
      bool same_scales = codes.sizes() == at::IntArrayRef({N, C}) && scales.numel() == N;
      for (int64_t n = 0; n < N && same_scales; ++n)
        same_scales &= naive_codes(of.data_ptr<float>() + n * C, C, 1, expect.data_ptr<int8_t>() + n * C, 1) ==
                       scales.data_ptr<float>()[n];
      EXPECT(same_scales && at::equal(codes, expect), "codes %s C %ld", c10::toString(out_type), (long)C);
    }
  }
  auto x = at::randn({4, 8}), w = at::randn({8}), b = at::randn({8});
  EXPECT_THROWS(fwd8.call(x.to(at::kDouble), std::nullopt, w.to(at::kDouble), b.to(at::kDouble), 1e-5,
                          std::nullopt),
                "out must be float32 or bfloat16");
}

// float32 x with a bfloat16 residual, out and grad_out (autocast): the same values as the
// float32 op on the widened residual, rounded once to bfloat16.
TEST_CASE(add_layer_norm_mixed_bfloat16_matches_float32) {
  auto fwd = harness::op<LayerNormForward>("ryzen_llm::add_layer_norm_forward");
  auto bwd = harness::op<LayerNormBackward>("ryzen_llm::add_layer_norm_backward");
  at::manual_seed(1);
  for (const std::vector<int64_t>& shape : std::vector<std::vector<int64_t>>{{3, 7}, {97, 48}, {2, 5, 129}}) {
    const int64_t C = shape.back();
    auto x = at::randn(shape), r = at::randn(shape).to(at::kBFloat16);
    auto w = at::randn({C}), b = at::randn({C});
    auto dy = at::randn(shape).to(at::kBFloat16), ds = at::randn(shape);
    auto [out, sum, mean, rstd] = fwd.call(x, r, w, b, 1e-5, at::kBFloat16);
    auto [e_out, e_sum, e_mean, e_rstd] = fwd.call(x, r.to(at::kFloat), w, b, 1e-5, std::nullopt);
    EXPECT(out.scalar_type() == at::kBFloat16 && sum.scalar_type() == at::kFloat, "dtypes");
    EXPECT(at::equal(out, e_out.to(at::kBFloat16)), "out is the float32 result rounded once");
    EXPECT(at::equal(sum, e_sum) && at::equal(mean, e_mean), "sum and statistics in float32");
    auto [dx, dw, db, dr] = bwd.call(dy, ds, sum, w, mean, rstd, at::kBFloat16);
    auto [e_dx, e_dw, e_db, e_dr] = bwd.call(dy.to(at::kFloat), ds, sum, w, mean, rstd, std::nullopt);
    EXPECT(at::equal(dx, e_dx) && at::equal(dw, e_dw) && at::equal(db, e_db), "float32 grads");
    EXPECT(dr.scalar_type() == at::kBFloat16 && at::equal(dr, e_dx.to(at::kBFloat16)),
           "grad_residual is grad_input rounded once");
  }
  auto x = at::randn({4, 8}), w = at::randn({8}), b = at::randn({8});
  EXPECT_THROWS(fwd.call(x, at::randn({4, 8}).to(at::kHalf), w, b, 1e-5, std::nullopt),
                "residual: expected dtype");
  EXPECT_THROWS(fwd.call(x, std::nullopt, w, b, 1e-5, at::kHalf), "out_dtype: expected dtype");
  EXPECT_THROWS(fwd.call(x.to(at::kDouble), at::randn({4, 8}).to(at::kBFloat16), w.to(at::kDouble),
                         b.to(at::kDouble), 1e-5, std::nullopt),
                "residual: expected dtype");
}

TEST_CASE(add_layer_norm_rejects_bad_input) {
  auto fwd = harness::op<LayerNormForward>("ryzen_llm::add_layer_norm_forward");
  auto x = at::randn({4, 8}), w = at::randn({8}), b = at::randn({8});
  const std::optional<at::ScalarType> same;
  EXPECT_THROWS(fwd.call(x, at::randn({4, 7}), w, b, 1e-5, same), "residual: expected sizes");
  EXPECT_THROWS(fwd.call(x, std::nullopt, at::randn({7}), b, 1e-5, same), "weight: expected sizes");
  EXPECT_THROWS(fwd.call(x.to(at::kInt), std::nullopt, w, b, 1e-5, same), "input: expected float32");
  EXPECT_THROWS(fwd.call(at::randn({8, 4}).t(), std::nullopt, at::randn({4}), at::randn({4}), 1e-5, same),
               "input: expected a contiguous tensor");
  EXPECT_THROWS(fwd.call(x, std::nullopt, w, b, -1.0, same), "eps: expected a positive value");
}


// ---- bias + GELU --------------------------------------------------------------------------
double gelu(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
double gelu_grad(double x) {
  return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI);
}

TEST_CASE(bias_gelu_matches_naive_loop) {
  auto fwd = harness::op<at::Tensor(const at::Tensor&, const at::Tensor&)>("ryzen_llm::bias_gelu_forward");
  auto bwd = harness::op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "ryzen_llm::bias_gelu_backward");
  at::manual_seed(1);
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kDouble}) {
    const double tol = dtype == at::kBFloat16 ? 3e-2 : (dtype == at::kFloat ? 1e-5 : 1e-12);
    for (auto [N, F] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 17}, {97, 48}, {64, 1024}}) {
      auto opts = at::TensorOptions().dtype(dtype);
      auto x = at::randn({N, F}, opts) * 3, b = at::randn({F}, opts), g = at::randn({N, F}, opts);
      auto y = fwd.call(x, b);
      auto [gx, gb] = bwd.call(g, x, b);
      auto X = x.to(at::kDouble).contiguous(), B = b.to(at::kDouble).contiguous();
      auto G = g.to(at::kDouble).contiguous();
      auto ey = at::empty({N, F}, at::kDouble), egx = at::empty({N, F}, at::kDouble);
      auto egb = at::zeros({F}, at::kDouble);
      const double *xp = X.data_ptr<double>(), *bp = B.data_ptr<double>(), *gp = G.data_ptr<double>();
      double *yp = ey.data_ptr<double>(), *gxp = egx.data_ptr<double>(), *gbp = egb.data_ptr<double>();
      for (int64_t i = 0; i < N; ++i)
        for (int64_t f = 0; f < F; ++f) {
          const double v = xp[i * F + f] + bp[f];
          yp[i * F + f] = gelu(v);
          const double d = gp[i * F + f] * gelu_grad(v);
          gxp[i * F + f] = d;
          gbp[f] += d;
        }
      const double rows = static_cast<double>(N);
      EXPECT(harness::max_abs_diff(y, ey) < tol * 8, "y dtype %s F %ld", c10::toString(dtype), (long)F);
      EXPECT(harness::max_abs_diff(gx, egx) < tol * 8, "grad_x");
      EXPECT(harness::max_abs_diff(gb, egb) < tol * 8 * (1 + rows), "grad_bias");
    }
  }
  EXPECT_THROWS(fwd.call(at::randn({4, 8}), at::randn({7})), "bias");
}

// ---- linear + cross-entropy ------------------------------------------------------------------
// The mean cross-entropy of the logits Z (N, V; float64) against t (ignoring -100) and its
// gradients through Z = H W^T with H (N, C) and W (V, C) as given (float64): in loops.
std::tuple<double, at::Tensor, at::Tensor> naive_linear_cross_entropy(const at::Tensor& Z, const at::Tensor& H,
                                                                      const at::Tensor& W, const at::Tensor& t) {
  const int64_t N = H.size(0), C = H.size(1), V = W.size(0);
  auto eh = at::zeros({N, C}, at::kDouble), ew = at::zeros({V, C}, at::kDouble);
  const double *zp = Z.data_ptr<double>(), *hp = H.data_ptr<double>(), *wp = W.data_ptr<double>();
  double *ehp = eh.data_ptr<double>(), *ewp = ew.data_ptr<double>();
  const int64_t* tp = t.data_ptr<int64_t>();
  double total = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t target = tp[i];
    if (target == -100) continue;
    ++count;
    const double* z = zp + i * V;
    double mx = -1e300, se = 0;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, z[v]);
    for (int64_t v = 0; v < V; ++v) se += std::exp(z[v] - mx);
    total += std::log(se) + mx - z[target];
    for (int64_t v = 0; v < V; ++v) {
      const double p = std::exp(z[v] - mx) / se - (v == target ? 1.0 : 0.0);
      for (int64_t c = 0; c < C; ++c) {
        ehp[i * C + c] += p * wp[v * C + c];
        ewp[v * C + c] += p * hp[i * C + c];
      }
    }
  }
  return {total / count, eh / count, ew / count};
}

// H W^T in float64, in loops.
at::Tensor naive_logits(const at::Tensor& H, const at::Tensor& W) {
  const int64_t N = H.size(0), C = H.size(1), V = W.size(0);
  auto Z = at::empty({N, V}, at::kDouble);
  const double *hp = H.data_ptr<double>(), *wp = W.data_ptr<double>();
  double* zp = Z.data_ptr<double>();
  for (int64_t i = 0; i < N; ++i)
    for (int64_t v = 0; v < V; ++v) {
      double s = 0;
      for (int64_t c = 0; c < C; ++c) s += hp[i * C + c] * wp[v * C + c];
      zp[i * V + v] = s;
    }
  return Z;
}

using LceShapes = std::vector<std::tuple<int64_t, int64_t, int64_t>>;

TEST_CASE(linear_cross_entropy_matches_naive_loop) {
  using Fn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, int64_t, bool, bool);
  auto fwd = harness::op<Fn>("ryzen_llm::linear_cross_entropy_forward");
  at::manual_seed(2);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const double tol = dtype == at::kFloat ? 2e-5 : 1e-12;
    for (auto [N, C, V] : LceShapes{{1, 8, 5}, {97, 48, 1000}, {300, 33, 257}}) {
      auto opts = at::TensorOptions().dtype(dtype);
      auto h = at::randn({N, C}, opts), w = at::randn({V, C}, opts) * 0.3;
      auto t = at::randint(0, V, {N}, at::kLong);
      if (N > 1) t[0] = -100;  // ignored (N = 1 keeps one real target)
      auto [loss, gh, gw] = fwd.call(h, w, t, -100, true, true);
      auto H = h.to(at::kDouble).contiguous(), W = w.to(at::kDouble).contiguous();
      auto [el, eh, ew] = naive_linear_cross_entropy(naive_logits(H, W), H, W, t);
      EXPECT(std::abs(loss.item<double>() - el) < tol * 10, "loss N %ld V %ld", (long)N, (long)V);
      EXPECT(harness::max_abs_diff(gh, eh) < tol, "grad_h N %ld V %ld", (long)N, (long)V);
      EXPECT(harness::max_abs_diff(gw, ew) < tol, "grad_weight N %ld V %ld", (long)N, (long)V);
    }
  }
  auto h = at::randn({4, 8}), w = at::randn({5, 8});
  EXPECT_THROWS(fwd.call(h, w, at::full({4}, 5, at::kLong), -100, true, true), "targets");
  EXPECT_THROWS(fwd.call(h, at::randn({5, 7}), at::zeros({4}, at::kLong), -100, true, true), "weight");
}

// The level-4 LM head: the logits from int8 codes (h's per row, the weight's per vocabulary row:
// exact integer sums times both scales), the gradients through the float h and weight; for both
// int8 GEMMs, on shapes that end a row chunk early (V 1000: 524 rows per chunk).
TEST_CASE(int8_linear_cross_entropy_matches_naive_loop) {
  using T = at::Tensor;
  auto quant = harness::op<std::tuple<T, T, T, T>(const T&, bool, bool)>("ryzen_llm::int8_quantize");
  using OT = std::optional<at::Tensor>;
  auto fwd = harness::op<std::tuple<T, T, T>(const T&, const T&, const T&, const T&, const T&, int64_t, bool,
                                             bool, const OT&, const OT&, bool, bool)>(
      "ryzen_llm::int8_linear_cross_entropy_forward");
  auto mode = harness::op<int64_t(int64_t)>("ryzen_llm::int8_gemm_mode");
  at::manual_seed(14);
  for (int64_t impl : {1, 2}) {
    const int64_t old = mode.call(impl);
    for (auto [N, C, V] : LceShapes{{1, 8, 5}, {97, 77, 1000}, {600, 33, 1000}}) {
      auto h = at::randn({N, C}), w = at::randn({V, C}) * 0.3;
      auto t = at::randint(0, V, {N}, at::kLong);
      if (N > 1) t[0] = -100;
      auto [hq, hs, u1, u2] = quant.call(h, true, false);
      auto [wq, ws, u3, u4] = quant.call(w, true, false);
      auto [loss, gh, gw] = fwd.call(h, w, wq, ws, t, -100, true, true, std::nullopt, std::nullopt, false, false);
      auto [loss2, gh2, gw2] = fwd.call(h, w, wq, ws, t, -100, true, true, hq, hs, false, false);  // h's codes given
      EXPECT(at::equal(loss, loss2) && at::equal(gh, gh2) && at::equal(gw, gw2), "given codes N %ld", (long)N);
      // grad_h from the int8 GEMM of the stochastically rounded gradient: the same loss and
      // grad_weight, grad_h within the int8 noise of the float one
      auto [loss3, gh3, gw3] = fwd.call(h, w, wq, ws, t, -100, true, true, hq, hs, true, false);
      EXPECT(at::equal(loss, loss3) && at::equal(gw, gw3), "int8 grad_h: loss, grad_weight N %ld", (long)N);
      EXPECT((gh3 - gh).norm().item<double>() <= 0.5 * gh.norm().item<double>() + 1e-12,
             "int8 grad_h N %ld: %g vs %g", (long)N, (gh3 - gh).norm().item<double>(), gh.norm().item<double>());
      // and grad_weight from the int8 GEMM too: loss and grad_h as before, grad_weight within the
      // int8 noise of the float one
      auto [loss4, gh4, gw4] = fwd.call(h, w, wq, ws, t, -100, true, true, hq, hs, true, true);
      EXPECT(at::equal(loss, loss4) && at::equal(gh3, gh4), "int8 grad_weight: loss, grad_h N %ld", (long)N);
      EXPECT((gw4 - gw).norm().item<double>() <= 0.5 * gw.norm().item<double>() + 1e-12,
             "int8 grad_weight N %ld: %g vs %g", (long)N, (gw4 - gw).norm().item<double>(),
             gw.norm().item<double>());
      auto Z = naive_logits(hq.to(at::kDouble), wq.to(at::kDouble)) * hs.to(at::kDouble).unsqueeze(1) *
               ws.to(at::kDouble).unsqueeze(0);
      auto [el, eh, ew] = naive_linear_cross_entropy(Z.contiguous(), h.to(at::kDouble), w.to(at::kDouble), t);
      EXPECT(std::abs(loss.item<double>() - el) < 2e-4, "loss impl %ld N %ld V %ld", (long)impl, (long)N, (long)V);
      EXPECT(harness::max_abs_diff(gh, eh) < 2e-5, "grad_h impl %ld N %ld V %ld", (long)impl, (long)N, (long)V);
      EXPECT(harness::max_abs_diff(gw, ew) < 2e-5, "grad_weight impl %ld N %ld V %ld", (long)impl, (long)N,
             (long)V);
    }
    mode.call(old);
  }
  auto h = at::randn({4, 8}), w = at::randn({5, 8});
  auto [wq, ws, u1, u2] = quant.call(w, true, false);
  const OT none;
  EXPECT_THROWS(fwd.call(h, w, wq.narrow(0, 0, 4), ws, at::zeros({4}, at::kLong), -100, true, true, none, none,
                         false, false),
                "w_codes");
  EXPECT_THROWS(fwd.call(h.to(at::kDouble), w, wq, ws, at::zeros({4}, at::kLong), -100, true, true, none, none,
                         false, false),
                "h");
  EXPECT_THROWS(fwd.call(h, w, wq, ws, at::zeros({4}, at::kLong), -100, true, true, wq.narrow(0, 0, 4), none,
                         false, false),
                "x_codes and x_scales: expected both");
  // a NaN in h: the int8 weight gradient is NaN everywhere (through h's largest row scale)
  auto hn = h.clone();
  hn[1][3] = std::numeric_limits<float>::quiet_NaN();
  auto [ln, ghn, gwn] = fwd.call(hn, w, wq, ws, at::zeros({4}, at::kLong), -100, true, true, none, none, true, true);
  EXPECT(gwn.isnan().all().item<bool>(), "int8 grad_weight with a NaN in h");
}

// ---- AdamW -----------------------------------------------------------------------------------
TEST_CASE(adamw_matches_naive_loop) {
  using Fn = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, double, double,
                  double, double, double, int64_t, double);
  auto step = harness::op<Fn>("ryzen_llm::adamw_step_");
  const double scale = 0.5;  // grad_scale: each gradient multiplied by it (clipping)
  at::manual_seed(3);
  const double lr = 1e-2, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;
  std::vector<at::Tensor> p, g, m, v;
  for (int64_t n : {1, 97, 4096 + 3}) {
    p.push_back(at::randn({n}, at::kDouble));
    g.push_back(at::randn({n}, at::kDouble));
    m.push_back(at::zeros({n}, at::kDouble));
    v.push_back(at::zeros({n}, at::kDouble));
  }
  std::vector<at::Tensor> ep, em, ev;
  for (size_t i = 0; i < p.size(); ++i) {
    ep.push_back(p[i].clone());
    em.push_back(m[i].clone());
    ev.push_back(v[i].clone());
  }
  for (int64_t s = 1; s <= 3; ++s) {
    step.call(p, g, m, v, lr, b1, b2, eps, wd, s, scale);
    for (size_t i = 0; i < p.size(); ++i) {
      auto P = ep[i].data_ptr<double>(), M = em[i].data_ptr<double>(), Vv = ev[i].data_ptr<double>();
      auto G = g[i].data_ptr<double>();
      for (int64_t j = 0; j < p[i].numel(); ++j) {
        P[j] *= 1 - lr * wd;
        const double gj = G[j] * scale;
        M[j] = b1 * M[j] + (1 - b1) * gj;
        Vv[j] = b2 * Vv[j] + (1 - b2) * gj * gj;
        const double mhat = M[j] / (1 - std::pow(b1, s)), vhat = Vv[j] / (1 - std::pow(b2, s));
        P[j] -= lr * mhat / (std::sqrt(vhat) + eps);
      }
    }
  }
  for (size_t i = 0; i < p.size(); ++i) {
    EXPECT(harness::max_abs_diff(p[i], ep[i]) < 1e-12, "param %zu", i);
    EXPECT(harness::max_abs_diff(m[i], em[i]) < 1e-12, "exp_avg %zu", i);
    EXPECT(harness::max_abs_diff(v[i], ev[i]) < 1e-12, "exp_avg_sq %zu", i);
  }
  std::vector<at::Tensor> short_grads(g.begin(), g.end() - 1);
  EXPECT_THROWS(step.call(p, short_grads, m, v, lr, b1, b2, eps, wd, 4, 1.0), "grads");
  EXPECT_THROWS(step.call(p, g, m, v, lr, b1, b2, eps, wd, 4, -1.0), "grad_scale");

  // float32 params with bfloat16 moments: each new moment is the float32 update of the stored
  // one, rounded to one of its two bfloat16 neighbours (stochastically: either may come out).
  std::vector<at::Tensor> p32, g32, m16, v16;
  for (int64_t n : {1, 97, 40000 + 3}) {  // the last spans two of the kernel's blocks
    p32.push_back(at::randn({n}));
    g32.push_back(at::randn({n}));
    m16.push_back(at::randn({n}).to(at::kBFloat16));
    v16.push_back(at::rand({n}).to(at::kBFloat16));
  }
  for (int64_t s = 1; s <= 2; ++s) {
    std::vector<at::Tensor> m_before, v_before;
    for (size_t i = 0; i < p32.size(); ++i) {
      m_before.push_back(m16[i].to(at::kFloat));
      v_before.push_back(v16[i].to(at::kFloat));
    }
    step.call(p32, g32, m16, v16, lr, b1, b2, eps, wd, s, 1.0);
    for (size_t i = 0; i < p32.size(); ++i) {
      const auto m_exact = m_before[i] * b1 + g32[i] * (1 - b1);
      const auto v_exact = v_before[i] * b2 + g32[i] * g32[i] * (1 - b2);
      // one bfloat16 spacing is 2^-7 of the value's binade: within 2^-7 relative of the exact value
      EXPECT(((m16[i].to(at::kFloat) - m_exact).abs() <= m_exact.abs() * 0.0079 + 1e-30).all().item<bool>(),
             "bf16 exp_avg %zu step %ld", i, (long)s);
      EXPECT(((v16[i].to(at::kFloat) - v_exact).abs() <= v_exact.abs() * 0.0079 + 1e-30).all().item<bool>(),
             "bf16 exp_avg_sq %zu step %ld", i, (long)s);
    }
  }
  std::vector<at::Tensor> p64{at::randn({4}, at::kDouble)}, g64{at::randn({4}, at::kDouble)};
  std::vector<at::Tensor> mb{at::zeros({4}, at::kBFloat16)}, vb{at::zeros({4}, at::kBFloat16)};
  EXPECT_THROWS(step.call(p64, g64, mb, vb, lr, b1, b2, eps, wd, 1, 1.0), "exp_avgs");
}

// ---- decode linear ----------------------------------------------------------------------------
// The weight layout of ryzen_llm.ops.decode_linear.pack_decode_weight: (ceil(N/16), ceil(K/2), 16, 2).
at::Tensor pack_decode_weight(const at::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1), N16 = (N + 15) / 16, K2 = (K + 1) / 2;
  auto p = at::zeros({N16 * 16, K2 * 2}, w.options());
  p.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
  return p.view({N16, 16, K2, 2}).permute({0, 2, 1, 3}).contiguous();
}

TEST_CASE(decode_linear_matches_naive_loop) {
  using Fn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool,
                        int64_t);
  auto lin = harness::op<Fn>("ryzen_llm::decode_linear");
  at::manual_seed(5);
  struct Shape { int64_t M, K, N; };
  for (int layout = 0; layout < 3; ++layout)  // float32, bfloat16, packed bfloat16
    for (auto [M, K, N] : std::vector<Shape>{{1, 7, 3}, {5, 33, 50}, {4, 512, 130}, {9, 80, 17}})
      for (bool gelu_on : {false, true}) {
        const auto wdtype = layout == 0 ? at::kFloat : at::kBFloat16;
        auto x = at::randn({M, K}), w = (at::randn({N, K}) / std::sqrt(double(K))).to(wdtype);
        auto b = at::randn({N});
        const at::Tensor wl = layout == 2 ? pack_decode_weight(w) : w;
        auto y = lin.call(x, wl, b, gelu_on, -1);
        // bfloat16 weights take x rounded to bfloat16 (autocast's rule).
        auto X = x.to(wdtype).to(at::kDouble).contiguous(), W = w.to(at::kDouble).contiguous();
        auto B = b.to(at::kDouble).contiguous();
        auto ey = at::empty({M, N}, at::kDouble);
        const double *xp = X.data_ptr<double>(), *wp = W.data_ptr<double>(), *bp = B.data_ptr<double>();
        double* yp = ey.data_ptr<double>();
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            double acc = bp[n];
            for (int64_t k = 0; k < K; ++k) acc += xp[m * K + k] * wp[n * K + k];
            yp[m * N + n] = gelu_on ? gelu(acc) : acc;
          }
        EXPECT(harness::max_abs_diff(y, ey) < 1e-5 * std::sqrt(double(K)) * 4, "M %ld K %ld N %ld",
               (long)M, (long)K, (long)N);
        // A row alone gives the bits it has in the batch.
        auto last = lin.call(x.narrow(0, M - 1, 1).contiguous(), wl, b, gelu_on, -1);
        EXPECT(at::equal(last, y.narrow(0, M - 1, 1)), "row %ld alone differs (layout %d)",
               (long)(M - 1), layout);
      }
  EXPECT_THROWS(lin.call(at::randn({2, 8}), at::randn({3, 7}), std::nullopt, false, -1), "weight");
  auto packed = pack_decode_weight(at::randn({20, 8}).to(at::kBFloat16));
  EXPECT_THROWS(lin.call(at::randn({2, 8}), packed, std::nullopt, false, -1),
                "out_features: required");
  EXPECT_THROWS(lin.call(at::randn({2, 8}), packed, std::nullopt, false, 40), "do not fit");
  EXPECT_THROWS(lin.call(at::randn({2, 10}), packed, std::nullopt, false, 20), "packed for 8");
}

// ---- causal attention decode against an int8 KV cache ----------------------------------------
// int8 caches (any q dtype) and float32 caches with float32 q: the AVX-512 head where the head dim
// is a multiple of 16 (48, 64, 80 here), the portable one for 33.
TEST_CASE(causal_attention_decode_matches_naive_loop) {
  using Fn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        double, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
  auto decode = harness::op<Fn>("ryzen_llm::causal_attention_decode");
  at::manual_seed(4);
  // (B, H, Tmax, D); row lengths: the full cache, one key, a ragged one.
  for (auto [B, H, Tmax, D] : std::vector<std::array<int64_t, 4>>{
           {1, 2, 1, 64}, {3, 2, 97, 48}, {3, 1, 128, 80}, {2, 2, 40, 33}}) {
    const std::vector<int64_t> all_lens = {Tmax, 1, Tmax / 2 + 3};
    const std::vector<int64_t> lens(all_lens.begin(), all_lens.begin() + B);
    auto lengths = at::tensor(lens, at::kLong);
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    for (bool quantized : {true, false}) {
      auto kc = quantized ? at::randint(-127, 128, {B, H, Tmax, D}, at::kChar)
                          : at::randn({B, H, Tmax, D});
      auto vc = quantized ? at::randint(-127, 128, {B, H, Tmax, D}, at::kChar)
                          : at::randn({B, H, Tmax, D});
      auto ks = quantized ? at::rand({B, H, Tmax}) * 0.05 : at::ones({B, H, Tmax});
      auto vs = quantized ? at::rand({B, H, Tmax}) * 0.05 : at::ones({B, H, Tmax});
      auto K = kc.to(at::kDouble), V = vc.to(at::kDouble);
      const double *kp = K.data_ptr<double>(), *vp = V.data_ptr<double>();
      const float *ksp = ks.data_ptr<float>(), *vsp = vs.data_ptr<float>();
      for (auto dtype : {at::kFloat, at::kBFloat16}) {
        if (!quantized && dtype != at::kFloat) continue;  // float caches take q's dtype
        auto q = at::randn({B, H, 1, D}).to(dtype);
        auto out = quantized ? decode.call(q, kc, vc, lengths, scale, ks, vs)
                             : decode.call(q, kc, vc, lengths, scale, std::nullopt, std::nullopt);
        EXPECT(out.scalar_type() == dtype, "out dtype %s", c10::toString(out.scalar_type()));
        auto Q = q.to(at::kDouble).contiguous();
        const double* qp = Q.data_ptr<double>();
        auto expected = at::zeros({B, H, D}, at::kDouble);
        double* ep = expected.data_ptr<double>();
        std::vector<double> p(Tmax);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t h = 0; h < H; ++h) {
            const int64_t bh = b * H + h, L = lens[b];
            double mx = -1e300, sum = 0;
            for (int64_t j = 0; j < L; ++j) {
              double dot = 0;
              for (int64_t d = 0; d < D; ++d) dot += qp[bh * D + d] * kp[(bh * Tmax + j) * D + d];
              p[j] = dot * ksp[bh * Tmax + j] * scale;
              mx = std::max(mx, p[j]);
            }
            for (int64_t j = 0; j < L; ++j) sum += (p[j] = std::exp(p[j] - mx));
            for (int64_t j = 0; j < L; ++j)
              for (int64_t d = 0; d < D; ++d)
                ep[bh * D + d] += p[j] / sum * vsp[bh * Tmax + j] * vp[(bh * Tmax + j) * D + d];
          }
        const double amax = std::max(1.0, expected.abs().max().item<double>());
        const double tol = (dtype == at::kBFloat16 ? 8e-3 : 2e-6) * amax;
        const double err = harness::max_abs_diff(out.reshape({B, H, D}), expected);
        EXPECT(err < tol, "B %ld Tmax %ld D %ld dtype %s %s cache: max error %.3e, bound %.3e",
               (long)B, (long)Tmax, (long)D, c10::toString(dtype), quantized ? "int8" : "float32",
               err, tol);
      }
    }
  }
  auto q = at::randn({2, 2, 1, 16});
  auto codes = at::zeros({2, 2, 7, 16}, at::kChar);
  auto s = at::ones({2, 2, 7});
  auto lengths = at::tensor(std::vector<int64_t>{7, 3}, at::kLong);
  EXPECT_THROWS(decode.call(q, codes, codes, lengths, 0.1, std::nullopt, s), "k_scale: required");
  EXPECT_THROWS(decode.call(q, codes, codes, lengths, 0.1, s, s.to(at::kDouble)),
                "v_scale: expected dtype float32");
  EXPECT_THROWS(decode.call(q, codes, codes, lengths, 0.1, s.narrow(2, 0, 6), s),
                "k_scale: expected sizes");
  EXPECT_THROWS(decode.call(q, q.expand({2, 2, 7, 16}), q.expand({2, 2, 7, 16}), lengths, 0.1, s, s),
                "k_scale: given with a Float cache");
}

}  // namespace

// ---- the level-4 int8 linear -------------------------------------------------------------------
// Codes per row and column against a naive absmax/round loop, and the forward and backward of
// int8_linear_forward/backward against naive integer sums of those codes, on awkward shapes.
namespace {
using QuantizeFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, bool,
                                                                              bool);
}  // namespace

TEST_CASE(int8_linear_matches_naive_loop) {
  auto quantize = harness::op<QuantizeFn>("ryzen_llm::int8_quantize");
  using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
      const at::Tensor&, bool, bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
  using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, bool, bool, bool);
  auto fwd = harness::op<Fwd>("ryzen_llm::int8_linear_forward");
  auto bwd = harness::op<Bwd>("ryzen_llm::int8_linear_backward");
  at::manual_seed(11);
  struct Shape { int64_t M, K, N; };
  for (auto [M, K, N] : std::vector<Shape>{{1, 5, 3}, {3, 40, 17}, {97, 77, 33}}) {
    auto x = at::randn({M, K}), w = at::randn({N, K}), b = at::randn({N}), gy = at::randn({M, N});
    // codes of x per row and per column, bit for bit
    auto [xr, xrs, xc, xcs] = quantize.call(x, true, true);
    auto er = at::empty({M, K}, at::kChar), ec = at::empty({M, K}, at::kChar);
    const float* xp = x.data_ptr<float>();
    bool same_scales = true;
    for (int64_t m = 0; m < M; ++m)
      same_scales &= naive_codes(xp + m * K, K, 1, er.data_ptr<int8_t>() + m * K, 1) ==
                     xrs.data_ptr<float>()[m];
    for (int64_t k = 0; k < K; ++k)
      same_scales &= naive_codes(xp + k, M, K, ec.data_ptr<int8_t>() + k, K) ==
                     xcs.data_ptr<float>()[k];
    EXPECT(same_scales && at::equal(xr, er) && at::equal(xc, ec), "codes M %ld K %ld", (long)M, (long)K);
    // forward: y = sum_k xr * wr * row scale * column scale + b
    auto [wr, wrs, wc, wcs] = quantize.call(w, true, false);
    auto [y, pre, x_codes, x_scales] = fwd.call(x, w, b, wr, wrs, false, true, std::nullopt, std::nullopt);
    // x's codes given (its producer's): the same y, x itself unread, no codes returned
    auto [y_given, pre_given, none_codes, none_scales] = fwd.call(at::zeros_like(x), w, b, wr, wrs, false, true,
                                                                  xr, xrs);
    EXPECT(at::equal(y_given, y) && none_codes.numel() == 0 && none_scales.numel() == 0, "given codes M %ld",
           (long)M);
    auto ey = at::empty({M, N}, at::kDouble);
    const int8_t *xq = xr.data_ptr<int8_t>(), *wq = wr.data_ptr<int8_t>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        int64_t acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += int64_t(xq[m * K + k]) * wq[n * K + k];
        ey.data_ptr<double>()[m * N + n] = double(acc) * xrs.data_ptr<float>()[m] *
                                           wrs.data_ptr<float>()[n] + b.data_ptr<float>()[n];
      }
    EXPECT(harness::max_abs_diff(y, ey) < 1e-5 * (1 + ey.abs().max().item<double>()), "forward M %ld", (long)M);
    EXPECT(at::equal(x_codes, xr) && at::equal(x_scales, xrs), "saved row codes");
    // backward (int8 weight gradient): grad_x from grad_y * w_scales per row with W's codes;
    // grad_W from grad_y * x_scales per column with x's row codes
    auto [gx, gw, gb] = bwd.call(gy, at::empty({0}), x_codes, x_scales, wr, wrs, false, true, true);
    auto [gr, grs, unused_c, unused_cs] = quantize.call(gy * wrs.unsqueeze(0), true, false);
    auto [unused_r, unused_rs, gc, gcs] = quantize.call(gy * xrs.unsqueeze(1), false, true);
    auto egx = at::empty({M, K}, at::kDouble), egw = at::empty({N, K}, at::kDouble);
    const int8_t *gq = gr.data_ptr<int8_t>(), *gcq = gc.data_ptr<int8_t>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        int64_t acc = 0;
        for (int64_t n = 0; n < N; ++n) acc += int64_t(gq[m * N + n]) * wq[n * K + k];
        egx.data_ptr<double>()[m * K + k] = double(acc) * grs.data_ptr<float>()[m];
      }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        int64_t acc = 0;
        for (int64_t m = 0; m < M; ++m) acc += int64_t(gcq[m * N + n]) * xq[m * K + k];
        egw.data_ptr<double>()[n * K + k] = double(acc) * gcs.data_ptr<float>()[n];
      }
    EXPECT(harness::max_abs_diff(gx, egx) < 1e-5 * (1 + egx.abs().max().item<double>()), "grad_x M %ld", (long)M);
    EXPECT(harness::max_abs_diff(gw, egw) < 1e-5 * (1 + egw.abs().max().item<double>()), "grad_w M %ld", (long)M);
    EXPECT(harness::max_abs_diff(gb, gy.sum(0)) < 1e-4 * M, "grad_b M %ld", (long)M);
  }
  EXPECT_THROWS(quantize.call(at::randn({3, 4}).to(at::kDouble), true, true), "x: expected float32 or bfloat16");
  auto w = at::randn({3, 8});
  auto [wr, wrs, wc, wcs] = quantize.call(w, true, false);
  EXPECT_THROWS(fwd.call(at::randn({2, 7}), w, std::nullopt, wr, wrs, false, false, std::nullopt, std::nullopt),
                "weight: expected sizes");
  auto x8 = at::randn({2, 8});
  auto [xq, xqs, xu1, xu2] = quantize.call(x8, true, false);
  EXPECT_THROWS(fwd.call(x8, w, std::nullopt, wr, wrs, false, false, xq, std::nullopt), "x_codes and x_scales");
  EXPECT_THROWS(fwd.call(x8, w, std::nullopt, wr, wrs, false, false, xq.narrow(0, 0, 1), xqs),
                "x_codes: expected sizes");
}

// int8_mm through the own kernel (here its plain loops: the sanitizer build has no VNNI path)
// and through at::_int_mm, against naive integer sums, on awkward shapes, a or b transposed.
TEST_CASE(int8_gemm_matches_naive_loop) {
  auto mm = harness::op<at::Tensor(const at::Tensor&, const at::Tensor&)>("ryzen_llm::int8_mm");
  auto mode = harness::op<int64_t(int64_t)>("ryzen_llm::int8_gemm_mode");
  at::manual_seed(12);
  struct Shape { int64_t M, K, N; };
  for (int64_t impl : {1, 2}) {
    const int64_t old = mode.call(impl);
    for (auto [M, K, N] : std::vector<Shape>{{1, 1, 1}, {3, 5, 17}, {49, 77, 33}, {97, 130, 70}}) {
      for (int layout = 0; layout < 3; ++layout) {  // contiguous, a transposed, b transposed
        auto a = at::randint(-128, 128, {M, K}, at::kChar), b = at::randint(-128, 128, {K, N}, at::kChar);
        if (layout == 1) a = a.t().contiguous().t();
        if (layout == 2) b = b.t().contiguous().t();
        auto c = mm.call(a, b);
        auto ac = a.contiguous(), bc = b.contiguous();
        const int8_t *ap = ac.data_ptr<int8_t>(), *bp = bc.data_ptr<int8_t>();
        bool same = c.scalar_type() == at::kInt && c.size(0) == M && c.size(1) == N;
        for (int64_t m = 0; m < M && same; ++m)
          for (int64_t n = 0; n < N; ++n) {
            int64_t acc = 0;
            for (int64_t k = 0; k < K; ++k) acc += int64_t(ap[m * K + k]) * bp[k * N + n];
            same &= acc == c.data_ptr<int32_t>()[m * N + n];
          }
        EXPECT(same, "int8_mm impl %ld M %ld K %ld N %ld layout %d", (long)impl, (long)M, (long)K,
               (long)N, layout);
      }
    }
    mode.call(old);
  }
  EXPECT_THROWS(mm.call(at::zeros({2, 3}), at::zeros({3, 2}, at::kChar)), "int8_mm: expected int8");
  EXPECT_THROWS(mode.call(9), "int8_gemm_mode: expected 0");
}

// The one-op feed-forward against the two int8 linears it replaces (bit for bit in bfloat16 but
// grad_b1, which sums the rounded gradient), for both GEMMs; under ASan/UBSan this also covers its
// epilogues' buffers.
TEST_CASE(int8_feed_forward_matches_two_int8_linears) {
  using T = at::Tensor;
  using OT = std::optional<at::Tensor>;
  auto quant = harness::op<std::tuple<T, T, T, T>(const T&, bool, bool)>("ryzen_llm::int8_quantize");
  auto lf = harness::op<std::tuple<T, T, T, T>(const T&, const T&, const OT&, const T&, const T&, bool, bool,
                                               const OT&, const OT&)>("ryzen_llm::int8_linear_forward");
  auto lb = harness::op<std::tuple<T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&, bool,
                                            bool, bool)>("ryzen_llm::int8_linear_backward");
  auto ff = harness::op<std::tuple<T, T, T, T, T, T>(const T&, const T&, const OT&, const T&, const T&,
                                                     const T&, const OT&, const T&, const T&, const OT&,
                                                     const OT&)>(
      "ryzen_llm::int8_feed_forward_forward");
  auto fb = harness::op<std::tuple<T, T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&,
                                                  const T&, const T&, const T&, const T&, bool)>(
      "ryzen_llm::int8_feed_forward_backward");
  auto mode = harness::op<int64_t(int64_t)>("ryzen_llm::int8_gemm_mode");
  at::manual_seed(13);
  struct Shape { int64_t M, C, F; };
  for (int64_t impl : {1, 2}) {
    const int64_t old = mode.call(impl);
    for (auto [M, C, F] : std::vector<Shape>{{1, 5, 3}, {3, 40, 17}, {97, 77, 33}}) {
      auto x = at::randn({M, C}).to(at::kBFloat16), gy = at::randn({M, C}).to(at::kBFloat16);
      auto w1 = at::randn({F, C}), b1 = at::randn({F}), w2 = at::randn({C, F}), b2 = at::randn({C});
      auto [w1c, w1s, u1, u2] = quant.call(w1, true, false);
      auto [w2c, w2s, u3, u4] = quant.call(w2, true, false);
      const OT none;
      auto [y, pre, xc, xs, hc, hs] = ff.call(x, w1, b1, w1c, w1s, w2, b2, w2c, w2s, none, none);
      auto [h, pre1, xc1, xs1] = lf.call(x, w1, b1, w1c, w1s, true, true, none, none);
      auto [y2, unused, hc2, hs2] = lf.call(h, w2, b2, w2c, w2s, false, true, none, none);
      auto [y3, pre3, xc3, xs3, hc3, hs3] = ff.call(x, w1, b1, w1c, w1s, w2, b2, w2c, w2s, xc, xs);
      EXPECT(at::equal(y3, y) && at::equal(hc3, hc) && xc3.numel() == 0, "given codes M %ld", (long)M);
      EXPECT(at::equal(y, y2) && at::equal(pre, pre1) && at::equal(hc, hc2) && at::equal(hs, hs2),
             "forward impl %ld M %ld C %ld F %ld", (long)impl, (long)M, (long)C, (long)F);
      auto [gx, gw1, gb1, gw2, gb2] = fb.call(gy, pre, xc, xs, hc, hs, w1c, w1s, w2c, w2s, true);
      auto [gh, gw2b, gb2b] = lb.call(gy, at::empty({0, 0}, gy.options()), hc2, hs2, w2c, w2s, false, true, true);
      auto [gxb, gw1b, gb1b] = lb.call(gh, pre1, xc1, xs1, w1c, w1s, true, true, true);
      EXPECT(at::equal(gx, gxb) && at::equal(gw1, gw1b) && at::equal(gw2, gw2b) && at::equal(gb2, gb2b),
             "backward impl %ld M %ld C %ld F %ld", (long)impl, (long)M, (long)C, (long)F);
      // each of the M rounded terms is off by at most 2^-9 of itself
      const double gb1_err = (gb1 - gb1b).abs().max().item<double>();
      EXPECT(gb1_err <= 3e-2 * gb1b.abs().max().item<double>(), "grad_b1 impl %ld M %ld: %g", (long)impl,
             (long)M, gb1_err);
    }
    mode.call(old);
  }
}

int main() {
  int passed = 0, failed = 0;
  for (const auto& c : harness::cases()) {
    const int before = harness::failures();
    try {
      c.fn();
    } catch (const std::exception& e) {
      ++harness::failures();
      std::fprintf(stderr, "  uncaught exception: %s\n", e.what());
    }
    const bool ok = harness::failures() == before;
    std::printf("[%s] %s\n", ok ? "PASS" : "FAIL", c.name);
    (ok ? passed : failed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
