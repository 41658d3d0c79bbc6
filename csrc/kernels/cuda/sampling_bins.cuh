// The arithmetic of the CUDA sampler's candidate path (sampling.cuh): linear
// bins over the distance below the row maximum, fixed-point probability mass,
// the top-k / top-p / top-logprob limits and packed candidate keys. Host and
// device code with no CUDA-only syntax, so that csrc/tests can check the
// selection logic the kernel relies on.
//
// Why bins are exact enough: position(l) is monotone non-increasing in l (a
// float subtraction and a multiplication by a non-negative scale, each
// correctly rounded), so every token of a lower bin has a strictly larger
// logit than every token of a higher bin. The cut between bins is therefore
// decided by counts and masses alone; only inside the threshold bin are the
// exact logit keys compared.
#pragma once
#include <math.h>

#include <climits>
#include <cstdint>

#include "../sampling.h"

namespace pyvlm {
namespace cuda {
namespace sampling {

constexpr int kNumBins = 2048;
// Bins span the thread maxima of the row (so that a count bound, top-k or
// top-logprob, is found whenever 512 maxima can give one), but at least
// kMinBinRange logits, and at most kMaxBinRange (a finite mask value such as
// -1e9 must not make them coarse).
constexpr float kMinBinRange = 32.f;
constexpr float kMaxBinRange = 256.f;
// With top-p they span (max - l) / T up to this: beyond it a token's fixed
// mass is 0 (e^-22 < 2^-31), so the top-p cut cannot lie further out.
constexpr float kMassBinRange = 22.f;
constexpr float kMassUnit = 2147483648.f;  // fixed mass of the maximum: 2^31

PYVLM_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}

// Inverse of float_key.
PYVLM_HD float float_from_key(uint32_t key) {
  return bits_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

// p(l) / p(max) = exp((l - max) / T); the same expression wherever a mass or
// the min-p test needs it, so that every use agrees bit for bit.
PYVLM_HD float relative_prob(float l, float max, float inv_temp) {
#if defined(__CUDA_ARCH__)
  return __expf((l - max) * inv_temp);
#else
  return expf((l - max) * inv_temp);
#endif
}

PYVLM_HD bool min_p_keeps(const RowFilter& f, float l, float max) {
  return f.min_p == 0.f || relative_prob(l, max, f.inv_temp) >= f.min_p;
}

// Relative probability in units of 2^-31 of the maximum's. Integer sums are
// exact, so the top-p cut does not depend on the summation order (the draw
// is deterministic whatever the atomics do) and a subset never outweighs a
// superset (which the bound from the thread maxima relies on).
PYVLM_HD uint32_t fixed_mass(float rel_prob) {
  const float scaled = rel_prob * kMassUnit;
  return scaled >= 0.f ? (scaled < 4294967040.f ? uint32_t(scaled) : UINT32_MAX) : 0u;
}

// The top-p cut in fixed-point units: for an integer mass m,
// m < top_p * sumT * 2^31  <=>  m < ceil(top_p * sumT * 2^31).
PYVLM_HD uint64_t fixed_mass_limit(float top_p, float sum_t) {
  const double limit = ceil(double(top_p) * double(sum_t) * double(kMassUnit));
  return limit > 0.0 ? (limit < 9.0e18 ? uint64_t(limit) : UINT64_MAX) : 0u;
}

// The predicate of radix_step on exact tallies: a token is kept iff the
// tokens with a strictly larger logit number fewer than max_count and weigh
// less than max_mass.
struct SelectLimits {
  int32_t max_count;
  uint64_t max_mass;

  PYVLM_HD bool ok(int32_t count_above, uint64_t mass_above) const {
    return count_above < max_count && mass_above < max_mass;
  }
};

PYVLM_HD SelectLimits sample_limits(const RowFilter& f, float sum_t) {
  return SelectLimits{f.top_k > 0 ? f.top_k : INT32_MAX,
                      f.top_p < 1.f ? fixed_mass_limit(f.top_p, sum_t) : UINT64_MAX};
}

PYVLM_HD SelectLimits top_limits(int num_top) { return SelectLimits{num_top, UINT64_MAX}; }

// Count and fixed mass of a set of tokens.
struct Tally {
  int32_t count;
  uint64_t mass;
};

PYVLM_HD Tally operator+(Tally a, Tally b) { return Tally{a.count + b.count, a.mass + b.mass}; }
PYVLM_HD Tally operator-(Tally a, Tally b) { return Tally{a.count - b.count, a.mass - b.mass}; }

// Bin b holds the tokens with position in [b, b + 1); the first bin also
// holds positions below 1 and the last everything from kNumBins - 1 on
// (and NaN). Positions are >= 0 for finite logits (l <= max).
struct RowBins {
  float max;
  float scale;  // bins per logit, finite and >= 0

  PYVLM_HD float position(float l) const { return (max - l) * scale; }
};

PYVLM_HD int bin_of(float position) {
  return position < 1.f ? 0 : position < float(kNumBins - 1) ? int(position) : kNumBins - 1;
}

// Where bin b starts; "bin kNumBins" starts at `end`, the end of the range.
PYVLM_HD float bin_start(int b, float end) { return b < kNumBins ? float(b) : end; }

// min_thread_max: the least finite thread maximum (+inf if none).
PYVLM_HD RowBins make_row_bins(float max, float min_thread_max, const RowFilter& f) {
  float range = fminf(fmaxf(max - min_thread_max, kMinBinRange), kMaxBinRange);  // NaN: 32
  if (f.select && f.top_p < 1.f) range = fmaxf(range, kMassBinRange / f.inv_temp);
  // range >= 32, or +inf for an absurd temperature (scale 0: one bin, still monotone)
  return RowBins{max, float(kNumBins) / range};
}

// A candidate token as one sort key: its logit key above ~index, so that a
// descending sort orders by logit descending, then index ascending. 0 is
// below every candidate (the low word of a real one is >= 2^31).
PYVLM_HD uint64_t pack_candidate(float l, int32_t index) {
  return (uint64_t(float_key(l)) << 32) | uint64_t(~uint32_t(index));
}
PYVLM_HD uint32_t candidate_key(uint64_t c) { return uint32_t(c >> 32); }
PYVLM_HD int32_t candidate_index(uint64_t c) { return int32_t(~uint32_t(c)); }
PYVLM_HD float candidate_logit(uint64_t c) { return float_from_key(candidate_key(c)); }

}  // namespace sampling
}  // namespace cuda
}  // namespace pyvlm
