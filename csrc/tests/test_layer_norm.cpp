// LayerNorm kernels against naive double-precision loops.
#include <cmath>
#include <vector>

#include "../kernels/dtypes.h"
#include "../kernels/layer_norm.h"
#include "harness.h"

namespace {

// bias may be empty (no bias).
std::vector<double> naive_layer_norm(const std::vector<float>& x, const std::vector<float>& w,
                                     const std::vector<float>& b, int64_t rows, int64_t hidden,
                                     double eps) {
  std::vector<double> out(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x.data() + r * hidden;
    double mean = 0, var = 0;
    for (int64_t i = 0; i < hidden; ++i) mean += row[i];
    mean /= hidden;
    for (int64_t i = 0; i < hidden; ++i) var += (row[i] - mean) * (row[i] - mean);
    const double inv = 1 / std::sqrt(var / hidden + eps);
    for (int64_t i = 0; i < hidden; ++i)
      out[r * hidden + i] = (row[i] - mean) * inv * w[i] + (b.empty() ? 0.0 : b[i]);
  }
  return out;
}

std::vector<float> shifted(std::vector<float> v, float by) {
  for (auto& x : v) x += by;
  return v;
}

}  // namespace

PYVLM_KERNEL_TEST(layer_norm_float_with_and_without_bias) {
  const int64_t rows = 3, hidden = 77;
  const auto x = shifted(pyvlm_test::random_floats(rows * hidden, 2.f), 5.f);
  const auto w = pyvlm_test::random_floats(hidden), b = pyvlm_test::random_floats(hidden);
  std::vector<float> out(x.size(), NAN);
  pyvlm::layer_norm(out.data(), x.data(), w.data(), b.data(), hidden, 1e-6f, 0, rows);
  EXPECT_NEAR_REL(out, naive_layer_norm(x, w, b, rows, hidden, 1e-6), 1e-5);
  std::vector<float> out_no_bias(x.size(), NAN);
  pyvlm::layer_norm<float>(out_no_bias.data(), x.data(), w.data(), nullptr, hidden, 1e-6f, 0,
                           rows);
  EXPECT_NEAR_REL(out_no_bias, naive_layer_norm(x, w, {}, rows, hidden, 1e-6), 1e-5);
}

PYVLM_KERNEL_TEST(fused_add_layer_norm_bf16) {
  const int64_t rows = 2, hidden = 1280;
  auto a = pyvlm_test::random_floats(rows * hidden), c = pyvlm_test::random_floats(rows * hidden);
  auto wf = pyvlm_test::random_floats(hidden), bf = pyvlm_test::random_floats(hidden);
  std::vector<pyvlm::bf16_t> in(a.size()), res(a.size()), w(hidden), b(hidden);
  std::vector<float> sum(a.size()), wr(hidden), br(hidden);
  for (size_t i = 0; i < a.size(); ++i) {
    in[i] = pyvlm::from_float<pyvlm::bf16_t>(a[i]);
    res[i] = pyvlm::from_float<pyvlm::bf16_t>(c[i] + 3.f);
    sum[i] = pyvlm::to_float(pyvlm::from_float<pyvlm::bf16_t>(pyvlm::to_float(in[i]) +
                                                              pyvlm::to_float(res[i])));
  }
  for (int64_t i = 0; i < hidden; ++i) {
    w[i] = pyvlm::from_float<pyvlm::bf16_t>(wf[i]);
    b[i] = pyvlm::from_float<pyvlm::bf16_t>(bf[i]);
    wr[i] = pyvlm::to_float(w[i]);
    br[i] = pyvlm::to_float(b[i]);
  }
  pyvlm::fused_add_layer_norm(in.data(), res.data(), w.data(), b.data(), hidden, 1e-5f, 0, rows);
  std::vector<float> got_res(a.size()), got(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    got_res[i] = pyvlm::to_float(res[i]);
    got[i] = pyvlm::to_float(in[i]);
  }
  EXPECT_TRUE(got_res == sum);  // the rounded add, exactly
  EXPECT_NEAR_REL(got, naive_layer_norm(sum, wr, br, rows, hidden, 1e-5), 1e-2);
}
