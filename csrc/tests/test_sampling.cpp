// Sampling and penalties CPU kernels against naive loops.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "../kernels/cuda/sampling_bins.cuh"
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

// The CUDA sampler's candidate path (kernels/cuda/sampling.cuh), modelled on
// the host with the same arithmetic (sampling_bins.cuh): its cut and top
// list must equal a brute-force cut over the whole row with the same fixed
// masses, whichever route (gathered, third pass, radix fallback) it takes.
namespace candidate_model {

using namespace pyvlm::cuda::sampling;

constexpr int kThreads = 512, kChunk = 4, kCapacity = 4096;  // as the fp32 kernel

enum class Route { gathered, bin_pass, radix };

struct Result {
  Route route;
  uint32_t threshold;
  std::vector<int32_t> top;
};

struct Row {
  std::vector<float> logits;
  pyvlm::RowFilter f;
  int num_top;
  RowBins bins;
  SelectLimits sample, top;
  bool with_mass;
};

std::vector<float> thread_maxima(const std::vector<float>& logits) {
  std::vector<float> maxima(kThreads, -INFINITY);
  for (size_t i = 0; i < logits.size(); ++i) {
    float& m = maxima[(i / kChunk) % kThreads];
    m = std::max(m, logits[i]);
  }
  return maxima;
}

Row make_row(std::vector<float> logits, float temperature, int32_t top_k, float top_p,
             int num_top) {
  const auto f = pyvlm::make_row_filter(temperature, top_k, top_p, 0.f, int64_t(logits.size()));
  Row r{std::move(logits), f, num_top};
  float max = -INFINITY;
  for (float l : r.logits) max = std::max(max, l);
  double sum_t = 0;
  for (float l : r.logits) sum_t += relative_prob(l, max, r.f.inv_temp);
  r.with_mass = r.f.select && r.f.top_p < 1.f;
  float min_thread_max = INFINITY;
  for (float m : thread_maxima(r.logits))
    if (m > -INFINITY) min_thread_max = std::min(min_thread_max, m);
  r.bins = make_row_bins(max, min_thread_max, r.f);
  r.sample = sample_limits(r.f, float(sum_t));
  r.top = top_limits(num_top);
  return r;
}

Tally weight(const Row& r, float l) {
  return Tally{1, r.with_mass ? fixed_mass(relative_prob(l, r.bins.max, r.f.inv_temp)) : 0u};
}

// Candidates sorted as the kernel sorts them.
std::vector<uint64_t> sorted_candidates(const Row& r, const std::vector<int32_t>& ids) {
  std::vector<uint64_t> c;
  for (int32_t i : ids) c.push_back(pack_candidate(r.logits[i], i));
  std::sort(c.begin(), c.end(), std::greater<uint64_t>());
  return c;
}

// The smallest key whose larger keys pass the limits (the largest key when
// none does), over sorted candidates preceded by `above`.
uint32_t threshold_of(const Row& r, const std::vector<uint64_t>& c, Tally above) {
  uint32_t min_passing = UINT32_MAX, max_key = 0;
  for (size_t j = 0; j < c.size(); ++j) {
    const uint32_t key = candidate_key(c[j]);
    max_key = std::max(max_key, key);
    if ((j == 0 || candidate_key(c[j - 1]) != key) && r.sample.ok(above.count, above.mass))
      min_passing = std::min(min_passing, key);
    above = above + weight(r, candidate_logit(c[j]));
  }
  return min_passing != UINT32_MAX ? min_passing : max_key;
}

std::vector<int32_t> top_of(const std::vector<uint64_t>& c, int num_top) {
  std::vector<int32_t> ids;
  for (int j = 0; j < num_top && j < int(c.size()); ++j) ids.push_back(candidate_index(c[j]));
  return ids;
}

struct Histogram {
  std::vector<Tally> above;  // exclusive prefix per bin, then the total
  int count(int b) const { return above[b + 1].count - above[b].count; }
  int first_failing(const SelectLimits& lim) const {
    for (int b = 0; b < kNumBins; ++b)
      if (!lim.ok(above[b].count, above[b].mass)) return b;
    return kNumBins;
  }
};

Histogram histogram(const Row& r, const std::vector<float>& values) {
  std::vector<Tally> bins(kNumBins, Tally{0, 0});
  for (float l : values) {
    const float x = r.bins.position(l);
    if (x < INFINITY) bins[bin_of(x)] = bins[bin_of(x)] + weight(r, l);
  }
  Histogram h{std::vector<Tally>(kNumBins + 1, Tally{0, 0})};
  for (int b = 0; b < kNumBins; ++b) h.above[b + 1] = h.above[b] + bins[b];
  return h;
}

std::vector<int32_t> tokens_where(const Row& r, const std::function<bool(float)>& in) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < r.logits.size(); ++i)
    if (in(r.bins.position(r.logits[i]))) ids.push_back(int32_t(i));
  return ids;
}

Result run(const Row& r) {
  const Histogram maxima = histogram(r, thread_maxima(r.logits));
  int end = 0;
  if (r.f.select) end = std::max(maxima.first_failing(r.sample), 1);
  if (r.num_top > 0) end = std::max(end, maxima.first_failing(r.top));
  const float gather_end = bin_start(end, INFINITY);
  const std::vector<int32_t> gathered = tokens_where(r, [&](float x) { return x < gather_end; });
  if (int(gathered.size()) <= kCapacity) {
    const auto c = sorted_candidates(r, gathered);
    return Result{Route::gathered, r.f.select ? threshold_of(r, c, Tally{0, 0}) : 0u,
                  top_of(c, r.num_top)};
  }
  std::vector<float> in_range;
  for (int32_t i : gathered) in_range.push_back(r.logits[i]);
  const Histogram h = histogram(r, in_range);
  int threshold = kNumBins, top_end = 0;
  if (r.f.select) {
    const int failing = h.first_failing(r.sample);
    int last_open = -1, first_filled = kNumBins;
    for (int b = 0; b < kNumBins; ++b) {
      if (h.count(b) == 0) continue;
      if (b < failing) last_open = b;
      first_filled = std::min(first_filled, b);
    }
    threshold = last_open >= 0 ? last_open : first_filled;
  }
  if (r.num_top > 0) top_end = h.first_failing(r.top);
  const float from = float(threshold), to = bin_start(threshold + 1, gather_end);
  const float top_below = r.num_top > 0 ? bin_start(top_end, gather_end) : 0.f;
  const auto bin_ids = tokens_where(r, [&](float x) { return x >= from && x < to; });
  const auto ids = tokens_where(r, [&](float x) { return x < top_below || (x >= from && x < to); });
  if (int(ids.size()) > kCapacity) return Result{Route::radix, 0u, {}};
  const uint32_t cut =
      r.f.select ? threshold_of(r, sorted_candidates(r, bin_ids), h.above[threshold]) : 0u;
  return Result{Route::bin_pass, cut, top_of(sorted_candidates(r, ids), r.num_top)};
}

// The same cut and list over every finite token of the row.
Result brute_force(const Row& r) {
  const auto all = sorted_candidates(r, tokens_where(r, [](float x) { return x < INFINITY; }));
  return Result{Route::radix, r.f.select ? threshold_of(r, all, Tally{0, 0}) : 0u,
                top_of(all, r.num_top)};
}

std::vector<float> normal_row(size_t vocab, float scale, float step) {
  auto l = pyvlm_test::random_floats(vocab, scale);
  if (step > 0)
    for (float& x : l) x = std::round(x / step) * step;  // many ties
  return l;
}

}  // namespace candidate_model

PYVLM_KERNEL_TEST(sample_bins_are_monotone_and_keys_round_trip) {
  using namespace pyvlm::cuda::sampling;
  const std::vector<float> edge{-INFINITY, -3e38f, -1.f, -0.f, 0.f, 1e-40f, 1.f, 3e38f, INFINITY};
  auto values = pyvlm_test::random_floats(2000, 50.f);
  values.insert(values.end(), edge.begin(), edge.end());
  std::sort(values.begin(), values.end());
  for (float max : {0.f, 7.5f, 3e38f}) {
    for (float temperature : {1e-3f, 1.f, 1e30f}) {
      const auto f = pyvlm::make_row_filter(temperature, 5, 0.5f, 0.f, 100);
      const RowBins bins = make_row_bins(max, max - 40.f, f);
      EXPECT_TRUE(bins.scale >= 0.f && bins.scale < INFINITY);
      for (size_t i = 1; i < values.size(); ++i) {
        if (values[i] > max) break;
        const float lo = bins.position(values[i - 1]), hi = bins.position(values[i]);
        EXPECT_TRUE(!(hi > lo) && bin_of(hi) <= bin_of(lo) && bin_of(lo) < kNumBins &&
                    bin_of(hi) >= 0);
      }
    }
  }
  for (float x : values) {
    EXPECT_TRUE(pyvlm::float_key(candidate_logit(pack_candidate(x, 7))) == pyvlm::float_key(x));
    EXPECT_TRUE(candidate_index(pack_candidate(x, 123456)) == 123456);
  }
  // Descending packs: larger logit first, then lower index.
  EXPECT_TRUE(pack_candidate(1.f, 9) > pack_candidate(0.5f, 0));
  EXPECT_TRUE(pack_candidate(1.f, 3) > pack_candidate(1.f, 4));
  EXPECT_TRUE(pack_candidate(-INFINITY, 0) > 0u);
}

PYVLM_KERNEL_TEST(sample_fixed_mass_limit_is_the_strict_top_p_cut) {
  using namespace pyvlm::cuda::sampling;
  for (float top_p : {0.1f, 0.5f, 0.9f, 0.999f}) {
    for (float sum_t : {1.f, 3.7f, 1234.5f}) {
      const uint64_t limit = fixed_mass_limit(top_p, sum_t);
      const double exact = double(top_p) * double(sum_t) * 2147483648.0;
      EXPECT_TRUE(double(limit - 1) < exact && double(limit) >= exact);
    }
  }
  EXPECT_TRUE(fixed_mass_limit(0.f, 5.f) == 0u);
  EXPECT_TRUE(fixed_mass_limit(0.5f, NAN) == 0u);
  EXPECT_TRUE(fixed_mass_limit(0.5f, INFINITY) == UINT64_MAX);
  EXPECT_TRUE(fixed_mass(1.f) == 2147483648u && fixed_mass(0.f) == 0u && fixed_mass(NAN) == 0u);
}

PYVLM_KERNEL_TEST(sample_candidate_path_equals_brute_force_cut) {
  using namespace candidate_model;
  const size_t vocab = 20000;
  int routes[3] = {0, 0, 0};
  const auto check = [&](const Row& r) {
    const Result got = run(r), want = brute_force(r);
    ++routes[int(got.route)];
    if (got.route == Route::radix) return;
    EXPECT_TRUE(got.threshold == want.threshold);
    EXPECT_TRUE(got.top == want.top);
  };
  for (float step : {0.f, 0.125f}) {
    for (float temperature : {0.4f, 1.f, 1.8f}) {
      for (int32_t top_k : {0, 1, 7, 50, 700}) {
        for (float top_p : {1.f, 0.9f, 0.5f, 0.f}) {
          const int num_top = (top_k + int(top_p * 10)) % 3 == 0 ? 20 : (top_k % 2);
          check(make_row(normal_row(vocab, 3.f, step), temperature, top_k, top_p, num_top));
        }
      }
    }
  }
  // Flat rows: the maxima bound nothing, the bins find the cut (third pass).
  for (float top_p : {0.5f, 0.95f}) check(make_row(normal_row(vocab, 0.2f, 0.f), 2.f, 0, top_p, 5));
  // Masked rows: fewer finite logits than num_top.
  std::vector<float> masked(vocab, -INFINITY);
  for (int i = 0; i < 10; ++i) masked[i * 1999] = float(i % 4);
  check(make_row(masked, 1.f, 50, 0.9f, 20));
  // One value everywhere: the threshold bin holds the whole row (radix).
  check(make_row(std::vector<float>(vocab, 0.f), 1.f, 50, 1.f, 3));
  // A peaked row (the 50th logit far below the first) and a row masked with a
  // finite value: the bins still span the thread maxima that bound the cut.
  auto peaked = normal_row(vocab, 3.f, 0.f);
  peaked[123] = 90.f;
  const Row peaked_row = make_row(peaked, 1.f, 50, 1.f, 20);
  EXPECT_TRUE(run(peaked_row).route == Route::gathered);
  check(peaked_row);
  auto finite_mask = normal_row(vocab, 3.f, 0.f);
  for (size_t i = 0; i < vocab; i += 3) finite_mask[i] = -1e9f;
  const Row masked_row = make_row(finite_mask, 0.7f, 40, 0.95f, 20);
  EXPECT_TRUE(run(masked_row).route == Route::gathered);
  check(masked_row);
  EXPECT_TRUE(routes[int(Route::gathered)] > 0 && routes[int(Route::bin_pass)] > 0 &&
              routes[int(Route::radix)] > 0);
}
