// Token sampling and logit penalties, framework-free.
//
// Sampling semantics (shared by the CPU and CUDA kernels): for a row of
// logits l and temperature T > 0, p = softmax(l / T). Token i is kept iff
//   top-k: fewer than k tokens have a strictly larger logit,
//   top-p: the total p of tokens with a strictly larger logit is < top_p,
//   min-p: p_i >= min_p * max(p),
// all three on the same unrenormalised p (ties are all kept; no sort). The
// token is argmax over kept i of l_i / T + g_i (Gumbel-max: an exact draw from
// p restricted to the kept set), g_i = -log(-log(u_i)) with u_i from Philox
// keyed by (seed, step) at counter i. T <= 0 is greedy (lowest index on ties).
//
// The top-k / top-p threshold is found without sorting by a radix select over
// the 32-bit order-preserving key of each logit: four passes of 8-bit
// digits, each a count (and probability mass) histogram of the tokens that
// share the digits fixed so far.
#pragma once
#include <math.h>

#include <climits>
#include <cstdint>

#include "philox.h"

namespace pyvlm {

constexpr int kSampleMaxTop = 20;  // most top log-probabilities per row
constexpr int kRadixBins = 256;    // 8-bit digits, four passes

struct SamplingParams {  // per-row arrays, [batch] each
  const float* temperatures;
  const int32_t* top_ks;
  const float* top_ps;
  const float* min_ps;
  const int64_t* seeds;
  const int64_t* steps;
};

struct SampleOutputs {
  int64_t* tokens;        // [batch]
  float* logprobs;        // [batch]
  int64_t* top_ids;       // [batch, num_top]
  float* top_logprobs;    // [batch, num_top]
  int64_t num_top;
};

// One row's filters after resolving the "off" encodings; robust to
// out-of-range values (the CUDA path does not validate them): NaN or
// non-positive T is greedy, min_p is clamped to [0, 1], top_p >= 1 (or NaN)
// is off and top_p <= 0 keeps only the largest logit (and its ties).
struct RowFilter {
  bool greedy;
  float inv_temp;
  int32_t top_k;  // 0 = off
  float top_p;    // 1 = off
  float min_p;    // 0 = off
  bool select;    // needs the top-k / top-p radix select
};

PYVLM_HD RowFilter make_row_filter(float temperature, int32_t top_k,
                                   float top_p, float min_p, int64_t vocab) {
  RowFilter f;
  f.greedy = !(temperature > 0.f);
  f.inv_temp = f.greedy ? 0.f : 1.f / temperature;
  f.top_k = (top_k > 0 && int64_t(top_k) < vocab) ? top_k : 0;
  f.top_p = top_p < 1.f ? (top_p > 0.f ? top_p : 0.f) : 1.f;
  f.min_p = min_p > 0.f ? (min_p < 1.f ? min_p : 1.f) : 0.f;
  f.select = !f.greedy && (f.top_k > 0 || f.top_p < 1.f);
  return f;
}

// Order-preserving map of a float to uint32 (larger float, larger key).
PYVLM_HD uint32_t float_key(float x) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(x);
#else
  std::memcpy(&u, &x, 4);
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// -log(-log(u)); -log(u) goes through log1p near u = 1 so that the small
// exponential variates that decide the draw keep full precision.
PYVLM_HD float gumbel_from_uniform(float u) {
  const float e = u > 0.5f ? -log1pf(u - 1.0f) : -logf(u);
  return -logf(e);
}

// Radix-select state: the key digits fixed so far (`prefix`), the count and
// mass of tokens whose key is above every key with that prefix, and (after a
// step) the count of tokens that fall in the chosen bin.
struct RadixState {
  uint32_t prefix;
  int32_t count_above;
  float mass_above;
  int32_t count_at;
};

// One digit of the select: the threshold is the smallest key v present with
// count(key > v) < max_count and mass(key > v) < max_mass. Walking the bins
// from the top, the bin holding it is the lowest non-empty bin whose largest
// token still satisfies the predicate (it is monotone in v). `mass` may be
// null (count-only predicate). If even the top bin fails (max_mass <= 0) the
// top bin is taken, so the largest logit is always kept.
PYVLM_HD void radix_step(RadixState& s, const int32_t* count, const float* mass,
                         int shift, int32_t max_count, float max_mass) {
  int32_t c = s.count_above;
  float m = s.mass_above;
  int chosen = -1;
  int32_t chosen_c = c;
  float chosen_m = m;
  for (int b = kRadixBins - 1; b >= 0; --b) {
    if (count[b] == 0) continue;
    const bool ok = c < max_count && m < max_mass;
    if (!ok && chosen >= 0) break;
    chosen = b;
    chosen_c = c;
    chosen_m = m;
    if (!ok) break;
    c += count[b];
    if (mass != nullptr) m += mass[b];
  }
  if (chosen < 0) chosen = 0;  // empty row: nothing to select
  s.prefix |= uint32_t(chosen) << shift;
  s.count_above = chosen_c;
  s.mass_above = chosen_m;
  s.count_at = count[chosen];
}

// Mask of the key bits fixed before the pass that reads digit `shift`.
PYVLM_HD uint32_t radix_mask(int shift) {
  return shift >= 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
}

// CPU kernel over rows [row_begin, row_end) of contiguous [batch, vocab]
// logits; T is float, half_t or bf16_t.
template <typename T>
void sample_rows(const T* logits, int64_t vocab, const SamplingParams& params,
                 const SampleOutputs& out, int64_t row_begin, int64_t row_end);

struct PenaltyParams {
  const int64_t* token_ids;      // [nnz], rows by cu_token_rows
  const int32_t* output_counts;  // [nnz]
  const int32_t* cu_token_rows;  // [batch + 1]
  const float* presence;         // [batch]
  const float* frequency;        // [batch]
  const float* repetition;       // [batch]
  const int64_t* bias_token_ids; // [nnz_bias], rows by cu_bias_rows
  const float* bias_values;      // [nnz_bias]
  const int32_t* cu_bias_rows;   // [batch + 1]
};

// Repetition penalty (logit > 0: / r, else * r), then presence and frequency
// on the listed tokens, then the logit bias. Computes in float32 and stores
// after the penalties and again after the bias. CPU kernel over rows
// [row_begin, row_end); expects validated (in-range, unique) ids.
template <typename T>
void apply_penalties_rows(T* logits, int64_t vocab, const PenaltyParams& p,
                          int64_t row_begin, int64_t row_end);

PYVLM_HD float penalize(float logit, float repetition, float presence,
                        float frequency, int32_t count) {
#if defined(__CUDA_ARCH__)
  // IEEE division and no fused multiply-add, whatever --use_fast_math says,
  // so the CUDA result matches the CPU one bit for bit.
  if (repetition != 1.f)
    logit = logit > 0.f ? __fdiv_rn(logit, repetition) : __fmul_rn(logit, repetition);
  if (count > 0) logit = __fsub_rn(logit, presence);
  return __fsub_rn(logit, __fmul_rn(frequency, float(count)));
#else
  if (repetition != 1.f) logit = logit > 0.f ? logit / repetition : logit * repetition;
  if (count > 0) logit -= presence;
  return logit - frequency * float(count);
#endif
}

}  // namespace pyvlm
