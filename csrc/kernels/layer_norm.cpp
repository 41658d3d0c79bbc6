// As in layers.cpp: without this GCC keeps the bf16/fp16 rounding branches
// (NaN checks) as control flow and the row loops stay scalar.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "layer_norm.h"

#include <cmath>

#include "dtypes.h"
#include "lane_sums.h"

namespace pyvlm {
namespace {

template <typename T>
float row_sum(const T* x, int64_t n) {
  return lane_sum(n, [x](int64_t i) { return to_float(x[i]); });
}

template <typename T>
float centered_sum_squares(const T* x, int64_t n, float mean) {
  return lane_sum(n, [x, mean](int64_t i) {
    const float d = to_float(x[i]) - mean;
    return d * d;
  });
}

struct RowMoments {
  float mean, rstd;
};

// Two passes (not E[x^2] - E[x]^2): rows of large mean and small spread,
// common in residual streams, would lose the variance to cancellation.
template <typename T>
RowMoments row_moments(const T* x, int64_t n, float eps) {
  const float mean = row_sum(x, n) / float(n);
  const float var = centered_sum_squares(x, n, mean) / float(n);
  return {mean, 1.f / std::sqrt(var + eps)};
}

// Reads x[i] before writing out[i], so out may alias x.
template <typename T>
void normalize_row(T* out, const T* x, const T* w, const T* b, int64_t n, RowMoments m) {
  if (b == nullptr) {
    for (int64_t i = 0; i < n; ++i)
      out[i] = from_float<T>((to_float(x[i]) - m.mean) * m.rstd * to_float(w[i]));
    return;
  }
  for (int64_t i = 0; i < n; ++i)
    out[i] = from_float<T>((to_float(x[i]) - m.mean) * m.rstd * to_float(w[i]) + to_float(b[i]));
}

// residual = round(x + residual), as torch's add in the dtype.
template <typename T>
void add_residual(const T* x, T* residual, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    residual[i] = from_float<T>(to_float(x[i]) + to_float(residual[i]));
}

}  // namespace

// AVX2/AVX-512 clones picked at load time, as in layers.cpp.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PYVLM_LN_VECTOR_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define PYVLM_LN_VECTOR_CLONES
#endif

template <typename T>
PYVLM_LN_VECTOR_CLONES void layer_norm(T* out, const T* in, const T* weight, const T* bias,
                                       int64_t hidden, float eps, int64_t row_begin,
                                       int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = in + r * hidden;
    normalize_row(out + r * hidden, x, weight, bias, hidden, row_moments(x, hidden, eps));
  }
}

template <typename T>
PYVLM_LN_VECTOR_CLONES void fused_add_layer_norm(T* input, T* residual, const T* weight,
                                                 const T* bias, int64_t hidden, float eps,
                                                 int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    T* x = input + r * hidden;
    T* res = residual + r * hidden;
    add_residual(x, res, hidden);
    normalize_row(x, res, weight, bias, hidden, row_moments(res, hidden, eps));
  }
}

#define PYVLM_INSTANTIATE_LAYER_NORMS(T)                                                    \
  template void layer_norm<T>(T*, const T*, const T*, const T*, int64_t, float, int64_t,    \
                              int64_t);                                                     \
  template void fused_add_layer_norm<T>(T*, T*, const T*, const T*, int64_t, float, int64_t, \
                                        int64_t);
PYVLM_INSTANTIATE_LAYER_NORMS(float)
PYVLM_INSTANTIATE_LAYER_NORMS(half_t)
PYVLM_INSTANTIATE_LAYER_NORMS(bf16_t)

}  // namespace pyvlm
