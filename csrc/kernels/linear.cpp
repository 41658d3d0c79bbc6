#include "linear.h"

#include "dtypes.h"

namespace pyvlm {
namespace {

// Eight independent partial sums, so the loop vectorises without
// reassociating one float sum (the compiler may not, without fast-math).
constexpr int kLanes = 8;

template <typename T>
float dot(const T* a, const T* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += to_float(a[k + l]) * to_float(b[k + l]);
  float sum = 0.f;
  for (; k < n; ++k) sum += to_float(a[k]) * to_float(b[k]);
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

}  // namespace

template <typename T, typename Out>
void skinny_gemm(Out* out, const T* in, const T* weight, const T* bias, int64_t num_tokens,
                 int64_t in_features, int64_t in_stride, int64_t out_features,
                 int64_t row_begin, int64_t row_end) {
  for (int64_t n = row_begin; n < row_end; ++n) {
    const T* w = weight + n * in_features;
    const float b = bias ? to_float(bias[n]) : 0.f;
    for (int64_t t = 0; t < num_tokens; ++t)
      out[t * out_features + n] = from_float<Out>(dot(in + t * in_stride, w, in_features) + b);
  }
}

#define PYVLM_INSTANTIATE_SKINNY_GEMM(T, Out)                                          \
  template void skinny_gemm<T, Out>(Out*, const T*, const T*, const T*, int64_t, int64_t, \
                                    int64_t, int64_t, int64_t, int64_t);
PYVLM_INSTANTIATE_SKINNY_GEMM(float, float)
PYVLM_INSTANTIATE_SKINNY_GEMM(half_t, half_t)
PYVLM_INSTANTIATE_SKINNY_GEMM(half_t, float)
PYVLM_INSTANTIATE_SKINNY_GEMM(bf16_t, bf16_t)
PYVLM_INSTANTIATE_SKINNY_GEMM(bf16_t, float)
#undef PYVLM_INSTANTIATE_SKINNY_GEMM

}  // namespace pyvlm
