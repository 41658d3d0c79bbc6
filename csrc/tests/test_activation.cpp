// Gated activations against a naive double-precision loop.
#include <cmath>

#include "../kernels/activation.h"
#include "../kernels/dtypes.h"
#include "harness.h"

PYVLM_KERNEL_TEST(silu_and_mul_float) {
  const int64_t tokens = 5, d = 37;
  auto in = pyvlm_test::random_floats(tokens * 2 * d, 2.f);
  std::vector<float> out(tokens * d, NAN);
  std::vector<double> ref(tokens * d);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < d; ++i) {
      const double x = in[t * 2 * d + i], y = in[t * 2 * d + d + i];
      ref[t * d + i] = x / (1 + std::exp(-x)) * y;
    }
  pyvlm::act_and_mul(out.data(), in.data(), d, 0, tokens, pyvlm::Activation::kSilu);
  EXPECT_NEAR_REL(out, ref, 1e-6);
}

PYVLM_KERNEL_TEST(gelu_and_mul_bf16) {
  const int64_t tokens = 3, d = 64;
  auto raw = pyvlm_test::random_floats(tokens * 2 * d, 2.f);
  std::vector<pyvlm::bf16_t> in(raw.size()), out(tokens * d);
  for (size_t i = 0; i < raw.size(); ++i) in[i] = pyvlm::from_float<pyvlm::bf16_t>(raw[i]);
  std::vector<double> ref(tokens * d);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < d; ++i) {
      const double x = pyvlm::to_float(in[t * 2 * d + i]);
      const double y = pyvlm::to_float(in[t * 2 * d + d + i]);
      ref[t * d + i] = 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))) * y;
    }
  pyvlm::act_and_mul(out.data(), in.data(), d, 0, tokens, pyvlm::Activation::kGelu);
  std::vector<float> got(out.size());
  for (size_t i = 0; i < out.size(); ++i) got[i] = pyvlm::to_float(out[i]);
  EXPECT_NEAR_REL(got, ref, 1e-2);
}
