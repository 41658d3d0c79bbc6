// Row reductions for the CPU kernels: kLanes independent partial sums, so
// the compiler vectorises the loop without reassociating float additions
// itself (it may not under strict IEEE semantics).
#pragma once

#include <cstdint>

namespace pyvlm {

constexpr int kSumLanes = 16;

// sum over i in [0, n) of term(i), term returning float.
template <typename Term>
inline float lane_sum(int64_t n, Term term) {
  float acc[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) acc[l] += term(i + l);
  float tail = 0.f;
  for (; i < n; ++i) tail += term(i);
  float total = 0.f;
  for (int l = 0; l < kSumLanes; ++l) total += acc[l];
  return total + tail;
}

}  // namespace pyvlm
