#include "activation.h"

#include <cmath>

#include "dtypes.h"

namespace pyvlm {
namespace {

inline float silu(float x) { return x / (1.f + std::exp(-x)); }
inline float gelu(float x) {
  return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f));
}
inline float gelu_tanh(float x) {
  const float k = 0.79788456080286536f;  // sqrt(2 / pi)
  return 0.5f * x * (1.f + std::tanh(k * (x + 0.044715f * x * x * x)));
}

template <typename T, float (*F)(float)>
void gated_rows(T* out, const T* in, int64_t d, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const T* x = in + t * 2 * d;
    T* y = out + t * d;
    for (int64_t i = 0; i < d; ++i)
      y[i] = from_float<T>(F(to_float(x[i])) * to_float(x[d + i]));
  }
}

}  // namespace

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
