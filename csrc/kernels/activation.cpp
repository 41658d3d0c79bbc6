// GCC will not if-convert float operations that could trap (it clones the
// clamped path of exp_approx, which then divides by a constant), so without
// this the activation loops stay scalar. Placed before the includes so that
// the inline dtype conversions share the option and still inline. Nothing
// here relies on floating-point traps; results are unchanged.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "activation.h"

#include <algorithm>
#include <cmath>

#include "dtypes.h"

namespace pyvlm {
namespace {

// exp(x) as Cephes' expf, written branch-free so that loops calling it
// vectorise (std::exp does not): x = n ln2 + r with |r| <= ln2 / 2 (ln2 split
// in two for an exact reduction), a degree-6 polynomial for exp(r), and 2^n
// built in the exponent bits. Relative error about 1e-7 (1-2 ulp); inputs
// are clamped to [-87.3, 88.3], where 2^n stays a normal float.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float shifter = 12582912.f;                  // 1.5 * 2^23: round to nearest
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const uint32_t scale_bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  return p * bits_to_float(scale_bits);
}

// erfc(z) for z >= 0: Numerical Recipes' erfcc (Chebyshev fit, fractional
// error below 1.2e-7), built on exp_approx so it vectorises too.
inline float erfc_nonnegative(float z) {
  const float t = 1.f / (1.f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  return t * exp_approx(p - z * z);
}

inline float silu(float x) { return x / (1.f + exp_approx(-x)); }

// x * Phi(x) with Phi(x) = erfc(-x / sqrt 2) / 2, from erfc(|x| / sqrt 2) so
// that neither tail loses digits to cancellation.
inline float gelu(float x) {
  const float half_tail = 0.5f * erfc_nonnegative(std::fabs(x) * 0.70710678118654752f);
  const float upper = 1.f - half_tail;  // computed unconditionally: a select, no branch
  return x * (x >= 0.f ? upper : half_tail);
}

// 0.5 x (1 + tanh(y)) = x / (1 + exp(-2y)): the same value without tanh.
inline float gelu_tanh(float x) {
  const float k = 0.79788456080286536f;  // sqrt(2 / pi)
  const float y = k * (x + 0.044715f * x * x * x);
  return x / (1.f + exp_approx(-2.f * y));
}

// The default x86-64 target has only 4-lane SSE2 and no FMA, where these
// loops run ~5x slower than with AVX2 + FMA; GCC clones the function per
// target and picks the best the CPU has at load time (ifunc).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PYVLM_VECTOR_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define PYVLM_VECTOR_CLONES
#endif

template <typename T, float (*F)(float)>
PYVLM_VECTOR_CLONES void gated_rows(T* out, const T* in, int64_t d, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const T* x = in + t * 2 * d;
    T* y = out + t * d;
    for (int64_t i = 0; i < d; ++i)
      y[i] = from_float<T>(F(to_float(x[i])) * to_float(x[d + i]));
  }
}

template <typename T>
inline float rounded_to(float x) {
  return to_float(from_float<T>(x));
}

template <typename T>
PYVLM_VECTOR_CLONES void quick_gelu_range(T* out, const T* in, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float x = to_float(in[i]);
    const float scaled = rounded_to<T>(1.702f * x);
    const float gate = rounded_to<T>(1.f / (1.f + exp_approx(-scaled)));
    out[i] = from_float<T>(x * gate);
  }
}

}  // namespace

template <typename T>
void quick_gelu(T* out, const T* in, int64_t begin, int64_t end) {
  quick_gelu_range<T>(out, in, begin, end);
}

template void quick_gelu<float>(float*, const float*, int64_t, int64_t);
template void quick_gelu<half_t>(half_t*, const half_t*, int64_t, int64_t);
template void quick_gelu<bf16_t>(bf16_t*, const bf16_t*, int64_t, int64_t);

template <typename T>
void act_and_mul(T* out, const T* in, int64_t d, int64_t token_begin,
                 int64_t token_end, Activation act) {
  switch (act) {
    case Activation::kSilu:
      return gated_rows<T, silu>(out, in, d, token_begin, token_end);
    case Activation::kGelu:
      return gated_rows<T, gelu>(out, in, d, token_begin, token_end);
    case Activation::kGeluTanh:
      return gated_rows<T, gelu_tanh>(out, in, d, token_begin, token_end);
  }
}

template void act_and_mul<float>(float*, const float*, int64_t, int64_t,
                                 int64_t, Activation);
template void act_and_mul<half_t>(half_t*, const half_t*, int64_t, int64_t,
                                  int64_t, Activation);
template void act_and_mul<bf16_t>(bf16_t*, const bf16_t*, int64_t, int64_t,
                                  int64_t, Activation);

}  // namespace pyvlm
