// Framework-free 16-bit float storage types for the CPU kernels.
//
// The kernels compute in float32; these types only load and store. Their
// layout matches at::Half / at::BFloat16 / __half / __nv_bfloat16 (2 bytes,
// IEEE binary16 and bfloat16 bit patterns), so adapters reinterpret pointers.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pyvlm {

struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }
inline float to_float(half_t x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1f;
  uint32_t mant = x.bits & 0x3ff;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // Subnormal half: value = mant * 2^-24.
    float f = std::ldexp(float(mant), -24);
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
}

template <typename T>
inline T from_float(float x);

template <>
inline float from_float<float>(float x) {
  return x;
}
template <>
inline bf16_t from_float<bf16_t>(float x) {
  uint32_t u = float_to_bits(x);
  if (std::isnan(x)) return bf16_t{uint16_t((u >> 16) | 0x40)};
  u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}
template <>
inline half_t from_float<half_t>(float x) {
  const uint32_t u = float_to_bits(x);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000);
  const float a = std::fabs(x);
  if (std::isnan(x)) return half_t{uint16_t(sign | 0x7e00)};
  if (a >= 65520.0f) return half_t{uint16_t(sign | 0x7c00)};  // rounds to inf
  if (a < 6.103515625e-05f) {
    // Subnormal (or zero): quantum 2^-24, nearbyint rounds half to even.
    return half_t{uint16_t(sign | uint16_t(std::nearbyint(a * 16777216.0f)))};
  }
  uint32_t au = u & 0x7fffffffu;
  au += 0xfff + ((au >> 13) & 1);  // round mantissa to 10 bits, ties to even
  const uint32_t exp = (au >> 23) - 112;
  return half_t{uint16_t(sign | (exp << 10) | ((au >> 13) & 0x3ff))};
}

}  // namespace pyvlm
