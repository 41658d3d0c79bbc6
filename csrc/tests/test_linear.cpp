// skinny_gemm against a naive double-precision loop.
#include <cmath>

#include "../kernels/dtypes.h"
#include "../kernels/linear.h"
#include "harness.h"

PYVLM_KERNEL_TEST(skinny_gemm_float_strided_rows_with_bias) {
  const int64_t tokens = 3, k = 37, n = 11, stride = 40;
  auto in = pyvlm_test::random_floats(tokens * stride);
  auto weight = pyvlm_test::random_floats(n * k);
  auto bias = pyvlm_test::random_floats(n);
  std::vector<float> out(tokens * n, NAN);
  std::vector<double> ref(tokens * n);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < n; ++j) {
      double s = bias[j];
      for (int64_t i = 0; i < k; ++i) s += double(in[t * stride + i]) * weight[j * k + i];
      ref[t * n + j] = s;
    }
  pyvlm::skinny_gemm<float, float>(out.data(), in.data(), weight.data(), bias.data(), tokens,
                                   k, stride, n, 0, n);
  EXPECT_NEAR_REL(out, ref, 1e-6);
}

PYVLM_KERNEL_TEST(skinny_gemm_bf16_to_float) {
  const int64_t tokens = 2, k = 64, n = 9;
  auto raw_in = pyvlm_test::random_floats(tokens * k);
  auto raw_w = pyvlm_test::random_floats(n * k);
  std::vector<pyvlm::bf16_t> in(raw_in.size()), weight(raw_w.size());
  for (size_t i = 0; i < in.size(); ++i) in[i] = pyvlm::from_float<pyvlm::bf16_t>(raw_in[i]);
  for (size_t i = 0; i < weight.size(); ++i)
    weight[i] = pyvlm::from_float<pyvlm::bf16_t>(raw_w[i]);
  std::vector<float> out(tokens * n, NAN);
  std::vector<double> ref(tokens * n);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t i = 0; i < k; ++i)
        s += double(pyvlm::to_float(in[t * k + i])) * pyvlm::to_float(weight[j * k + i]);
      ref[t * n + j] = s;
    }
  pyvlm::skinny_gemm<pyvlm::bf16_t, float>(out.data(), in.data(), weight.data(), nullptr,
                                           tokens, k, k, n, 0, n);
  EXPECT_NEAR_REL(out, ref, 1e-6);
}
