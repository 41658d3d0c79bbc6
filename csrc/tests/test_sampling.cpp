// Sampling and penalties CPU kernels against naive loops.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../kernels/dtypes.h"
#include "../kernels/philox.h"
#include "../kernels/sampling.h"
#include "harness.h"

namespace {

struct Outputs {
  std::vector<int64_t> tokens, top_ids;
  std::vector<float> logprobs, top_lp;
};

Outputs run_sample(const std::vector<float>& logits, int64_t batch, int64_t vocab, float temp,
                   int32_t top_k, float top_p, int64_t num_top, int64_t seed) {
  std::vector<float> t(batch, temp), p(batch, top_p), mp(batch, 0.f);
  std::vector<int32_t> k(batch, top_k);
  std::vector<int64_t> seeds(batch, seed), steps(batch);
  for (int64_t r = 0; r < batch; ++r) steps[r] = r;
  Outputs o{std::vector<int64_t>(batch), std::vector<int64_t>(batch * num_top),
            std::vector<float>(batch), std::vector<float>(batch * num_top)};
  const pyvlm::SamplingParams params{t.data(), k.data(), p.data(), mp.data(), seeds.data(),
                                     steps.data()};
  const pyvlm::SampleOutputs out{o.tokens.data(), o.logprobs.data(), o.top_ids.data(),
                                 o.top_lp.data(), num_top};
  pyvlm::sample_rows(logits.data(), vocab, params, out, 0, batch);
  return o;
}

}  // namespace

PYVLM_KERNEL_TEST(sample_greedy_and_top_logprobs) {
  const int64_t batch = 4, vocab = 301, num_top = 6;
  auto logits = pyvlm_test::random_floats(batch * vocab, 3.f);
  const Outputs o = run_sample(logits, batch, vocab, 0.f, 0, 1.f, num_top, 0);
  for (int64_t r = 0; r < batch; ++r) {
    const float* l = logits.data() + r * vocab;
    std::vector<int64_t> order(vocab);
    for (int64_t i = 0; i < vocab; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return l[a] > l[b]; });
    double norm = 0;
    for (int64_t i = 0; i < vocab; ++i) norm += std::exp(double(l[i]) - l[order[0]]);
    const double log_norm = l[order[0]] + std::log(norm);
    EXPECT_TRUE(o.tokens[r] == order[0]);
    EXPECT_TRUE(std::fabs(o.logprobs[r] - (l[order[0]] - log_norm)) < 1e-5);
    for (int64_t j = 0; j < num_top; ++j) {
      EXPECT_TRUE(o.top_ids[r * num_top + j] == order[j]);
      EXPECT_TRUE(std::fabs(o.top_lp[r * num_top + j] - (l[order[j]] - log_norm)) < 1e-5);
    }
  }
}

PYVLM_KERNEL_TEST(sample_top_k_stays_in_top_k) {
  const int64_t batch = 64, vocab = 100;
  auto row = pyvlm_test::random_floats(vocab, 2.f);
  std::vector<float> logits;
  for (int64_t r = 0; r < batch; ++r) logits.insert(logits.end(), row.begin(), row.end());
  const Outputs o = run_sample(logits, batch, vocab, 1.f, 3, 1.f, 0, 42);
  std::vector<float> sorted = row;
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  bool varied = false;
  for (int64_t r = 0; r < batch; ++r) {
    EXPECT_TRUE(row[o.tokens[r]] >= sorted[2]);
    varied |= o.tokens[r] != o.tokens[0];
  }
  EXPECT_TRUE(varied);
}

PYVLM_KERNEL_TEST(philox_known_answer) {
  // Random123's kat_vectors: philox4x32_10 with counter and key all ones bits.
  const auto r = pyvlm::philox::philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
                                              0xffffffffu, 0xffffffffu);
  EXPECT_TRUE(r.x == 0x408f276du && r.y == 0x41c83b0eu && r.z == 0xa20bc7c6u &&
              r.w == 0x6d5451fdu);
  const auto z = pyvlm::philox::philox4x32_10({0, 0, 0, 0}, 0, 0);
  EXPECT_TRUE(z.x == 0x6627e8d5u && z.y == 0xe169c58du && z.z == 0xbc57ac4cu &&
              z.w == 0x9b00dbd8u);
}

PYVLM_KERNEL_TEST(apply_penalties_bf16) {
  const int64_t batch = 2, vocab = 10;
  auto raw = pyvlm_test::random_floats(batch * vocab, 3.f);
  std::vector<pyvlm::bf16_t> x(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) x[i] = pyvlm::from_float<pyvlm::bf16_t>(raw[i]);
  const std::vector<pyvlm::bf16_t> before = x;
  const std::vector<int64_t> ids{1, 4, 7, 2};
  const std::vector<int32_t> counts{0, 2, 1, 3}, cu{0, 3, 4};
  const std::vector<float> pres{0.5f, 0.1f}, freq{0.25f, 0.f}, rep{1.3f, 0.8f};
  const std::vector<int64_t> b_ids{4, 9};
  const std::vector<float> b_vals{1.f, -2.f};
  const std::vector<int32_t> b_cu{0, 1, 2};
  const pyvlm::PenaltyParams p{ids.data(), counts.data(), cu.data(), pres.data(), freq.data(),
                               rep.data(), b_ids.data(), b_vals.data(), b_cu.data()};
  pyvlm::apply_penalties_rows(x.data(), vocab, p, 0, batch);
  std::vector<double> got(x.size()), ref(x.size());
  for (size_t i = 0; i < x.size(); ++i) got[i] = pyvlm::to_float(x[i]), ref[i] = pyvlm::to_float(before[i]);
  for (int r = 0; r < 2; ++r)
    for (int j = cu[r]; j < cu[r + 1]; ++j) {
      double& v = ref[r * vocab + ids[j]];
      v = v > 0 ? v / rep[r] : v * rep[r];
      v -= (counts[j] > 0 ? pres[r] : 0) + freq[r] * counts[j];
    }
  ref[0 * vocab + 4] += 1.0;
  ref[1 * vocab + 9] -= 2.0;
  EXPECT_NEAR_REL(got, ref, 1e-2);
}
