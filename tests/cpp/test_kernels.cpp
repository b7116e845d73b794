// Every CPU kernel against a naive double-precision loop, on random awkward shapes, reached
// through the dispatcher exactly as Python reaches it. Run under ASan/UBSan in CI.
#include "test_harness.h"

#include <cmath>
#include <optional>
#include <tuple>

namespace {

using LayerNormForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    double);
using LayerNormBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&);

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
      auto [out, sum, mean, rstd] = fwd.call(x, r, w, b, 1e-5);
      auto [dx, dw, db] = bwd.call(dy, ds, sum, w, mean, rstd);
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

TEST_CASE(add_layer_norm_rejects_bad_input) {
  auto fwd = harness::op<LayerNormForward>("ryzen_llm::add_layer_norm_forward");
  auto x = at::randn({4, 8}), w = at::randn({8}), b = at::randn({8});
  EXPECT_THROWS(fwd.call(x, at::randn({4, 7}), w, b, 1e-5), "residual: expected sizes");
  EXPECT_THROWS(fwd.call(x, std::nullopt, at::randn({7}), b, 1e-5), "weight: expected sizes");
  EXPECT_THROWS(fwd.call(x.to(at::kInt), std::nullopt, w, b, 1e-5), "input: expected float32");
  EXPECT_THROWS(fwd.call(at::randn({8, 4}).t(), std::nullopt, at::randn({4}), at::randn({4}), 1e-5),
               "input: expected a contiguous tensor");
  EXPECT_THROWS(fwd.call(x, std::nullopt, w, b, -1.0), "eps: expected a positive value");
}

}  // namespace

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
