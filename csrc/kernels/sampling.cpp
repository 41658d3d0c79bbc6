#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "dtypes.h"

namespace pyvlm {
namespace {

// Max, softmax normalisers at temperature 1 and at T, and the first argmax.
struct RowStats {
  float max;
  float sum1;  // sum exp(l - max)
  float sumT;  // sum exp((l - max) / T)
  int64_t argmax;
};

RowStats row_stats(const float* l, int64_t vocab, const RowFilter& f) {
  RowStats s{-INFINITY, 0.f, 0.f, 0};
  for (int64_t i = 0; i < vocab; ++i)
    if (l[i] > s.max) s.max = l[i], s.argmax = i;
  if (s.max == -INFINITY) return s;
  // double accumulators: a float running sum over 150k terms loses ~1e-4.
  double sum1 = 0, sumT = 0;
  for (int64_t i = 0; i < vocab; ++i) sum1 += std::exp(l[i] - s.max);
  if (!f.greedy)
    for (int64_t i = 0; i < vocab; ++i) sumT += std::exp((l[i] - s.max) * f.inv_temp);
  s.sum1 = float(sum1);
  s.sumT = float(sumT);
  return s;
}

// Four 8-bit radix passes over the keys; `mass` (may be null) is each
// token's unnormalised probability. Returns the threshold's state.
RadixState radix_select(const uint32_t* keys, const float* mass, int64_t vocab,
                        int32_t max_count, float max_mass) {
  RadixState s{0u, 0, 0.f, 0};
  int32_t count[kRadixBins];
  double mass_sum[kRadixBins];  // see row_stats
  float bin_mass[kRadixBins];
  for (int shift = 24; shift >= 0; shift -= 8) {
    std::fill(count, count + kRadixBins, 0);
    std::fill(mass_sum, mass_sum + kRadixBins, 0.0);
    const uint32_t mask = radix_mask(shift);
    for (int64_t i = 0; i < vocab; ++i) {
      if ((keys[i] & mask) != s.prefix) continue;
      const uint32_t d = (keys[i] >> shift) & 0xFFu;
      ++count[d];
      if (mass != nullptr) mass_sum[d] += mass[i];
    }
    for (int b = 0; b < kRadixBins; ++b) bin_mass[b] = float(mass_sum[b]);
    radix_step(s, count, mass != nullptr ? bin_mass : nullptr, shift, max_count, max_mass);
  }
  return s;
}

// Gumbel-max over the kept tokens (key >= threshold and p_rel >= min_p).
int64_t gumbel_argmax(const float* l, const uint32_t* keys, int64_t vocab,
                      const RowStats& st, const RowFilter& f, uint32_t threshold,
                      int64_t seed, int64_t step) {
  float best = -INFINITY;
  int64_t best_i = -1;
  int64_t block = -1;
  philox::Uint4 r{};
  for (int64_t i = 0; i < vocab; ++i) {
    if (keys[i] < threshold) continue;
    const float z = (l[i] - st.max) * f.inv_temp;
    if (f.min_p > 0.f && !(std::exp(z) >= f.min_p)) continue;
    if ((i >> 2) != block) block = i >> 2, r = philox::random_block(seed, step, uint32_t(block));
    const float score = z + gumbel_from_uniform(philox::uniform_open(philox::lane(r, int(i & 3))));
    if (score > best) best = score, best_i = i;
  }
  return best_i >= 0 ? best_i : st.argmax;
}

// The num_top largest logits, descending, lower index first on ties.
void top_logprobs(const float* l, const uint32_t* keys, int64_t vocab, int64_t num_top,
                  float log_norm, int64_t* ids, float* values) {
  const RadixState s = radix_select(keys, nullptr, vocab, int32_t(num_top), INFINITY);
  std::vector<int64_t> picked;
  int64_t ties_left = num_top - s.count_above;
  for (int64_t i = 0; i < vocab; ++i) {
    if (keys[i] > s.prefix) picked.push_back(i);
    else if (keys[i] == s.prefix && ties_left > 0) picked.push_back(i), --ties_left;
  }
  std::sort(picked.begin(), picked.end(), [&](int64_t a, int64_t b) {
    return keys[a] != keys[b] ? keys[a] > keys[b] : a < b;
  });
  for (int64_t j = 0; j < num_top; ++j) {
    const bool ok = j < int64_t(picked.size());
    ids[j] = ok ? picked[j] : 0;
    values[j] = ok ? l[picked[j]] - log_norm : -INFINITY;
  }
}

struct RowScratch {
  std::vector<float> logits, mass;
  std::vector<uint32_t> keys;
};

template <typename T>
void sample_one_row(const T* x, int64_t vocab, const SamplingParams& p,
                    const SampleOutputs& out, int64_t row, RowScratch& w) {
  for (int64_t i = 0; i < vocab; ++i) w.logits[i] = to_float(x[i]);
  const float* l = w.logits.data();
  const RowFilter f = make_row_filter(p.temperatures[row], p.top_ks[row], p.top_ps[row],
                                      p.min_ps[row], vocab);
  const RowStats st = row_stats(l, vocab, f);
  const bool need_keys = !f.greedy || out.num_top > 0;
  if (need_keys)
    for (int64_t i = 0; i < vocab; ++i) w.keys[i] = float_key(l[i]);
  uint32_t threshold = 0;
  if (f.select) {
    const bool use_mass = f.top_p < 1.f;
    if (use_mass)
      for (int64_t i = 0; i < vocab; ++i) w.mass[i] = std::exp((l[i] - st.max) * f.inv_temp);
    threshold = radix_select(w.keys.data(), use_mass ? w.mass.data() : nullptr, vocab,
                             f.top_k > 0 ? f.top_k : INT32_MAX,
                             use_mass ? f.top_p * st.sumT : INFINITY)
                    .prefix;
  }
  const int64_t token = f.greedy ? st.argmax
                                 : gumbel_argmax(l, w.keys.data(), vocab, st, f, threshold,
                                                 p.seeds[row], p.steps[row]);
  const float log_norm = st.max + std::log(st.sum1);
  out.tokens[row] = token;
  out.logprobs[row] = l[token] - log_norm;
  if (out.num_top > 0)
    top_logprobs(l, w.keys.data(), vocab, out.num_top, log_norm,
                 out.top_ids + row * out.num_top, out.top_logprobs + row * out.num_top);
}

}  // namespace

template <typename T>
void sample_rows(const T* logits, int64_t vocab, const SamplingParams& params,
                 const SampleOutputs& out, int64_t row_begin, int64_t row_end) {
  RowScratch w;
  w.logits.resize(vocab);
  w.mass.resize(vocab);
  w.keys.resize(vocab);
  for (int64_t r = row_begin; r < row_end; ++r)
    sample_one_row(logits + r * vocab, vocab, params, out, r, w);
}

template <typename T>
void apply_penalties_rows(T* logits, int64_t vocab, const PenaltyParams& p,
                          int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    T* x = logits + r * vocab;
    for (int64_t j = p.cu_token_rows[r]; j < p.cu_token_rows[r + 1]; ++j) {
      T& v = x[p.token_ids[j]];
      v = from_float<T>(penalize(to_float(v), p.repetition[r], p.presence[r],
                                 p.frequency[r], p.output_counts[j]));
    }
    for (int64_t j = p.cu_bias_rows[r]; j < p.cu_bias_rows[r + 1]; ++j) {
      T& v = x[p.bias_token_ids[j]];
      v = from_float<T>(to_float(v) + p.bias_values[j]);
    }
  }
}

#define PYVLM_INSTANTIATE_SAMPLING(T)                                                    \
  template void sample_rows<T>(const T*, int64_t, const SamplingParams&,                \
                               const SampleOutputs&, int64_t, int64_t);                 \
  template void apply_penalties_rows<T>(T*, int64_t, const PenaltyParams&, int64_t, int64_t);
PYVLM_INSTANTIATE_SAMPLING(float)
PYVLM_INSTANTIATE_SAMPLING(half_t)
PYVLM_INSTANTIATE_SAMPLING(bf16_t)
#undef PYVLM_INSTANTIATE_SAMPLING

}  // namespace pyvlm
