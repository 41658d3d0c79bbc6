// As in activation.cpp: without this GCC keeps the bf16/fp16 rounding
// branches (NaN checks) as control flow and the row loops stay scalar.
// Nothing here relies on floating-point traps; results are unchanged.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "layers.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "dtypes.h"
#include "lane_sums.h"

namespace pyvlm {
namespace {

template <typename T>
float sum_squares(const T* x, int64_t n) {
  return lane_sum(n, [x](int64_t i) {
    const float v = to_float(x[i]);
    return v * v;
  });
}

// residual = round(x + residual). Kept apart from the sum of squares (which
// re-reads the row from L1) because GCC does not vectorise the fused loop.
template <typename T>
void add_residual(const T* x, T* residual, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    residual[i] = from_float<T>(to_float(x[i]) + to_float(residual[i]));
}

// Torch's CPU mean divides the sum by n; rsqrt is 1 / sqrt, both correctly
// rounded float32 operations.
float inverse_rms(float sum_sq, int64_t n, float eps) {
  return 1.f / std::sqrt(sum_sq / float(n) + eps);
}

// HF rounds x * r to the model dtype before the weight multiply.
template <typename T>
void scale_row(T* out, const T* x, const T* w, int64_t n, float r) {
  for (int64_t i = 0; i < n; ++i) {
    const T y = from_float<T>(to_float(x[i]) * r);
    out[i] = from_float<T>(to_float(w[i]) * to_float(y));
  }
}

// Rotates one head's first 2 * half elements by the angles whose cos/sin
// are given, as HF's q * cos + rotate_half(q) * sin in float32.
template <typename T>
void rotate_head(T* x, const float* cos, const float* sin, int64_t half,
                 bool is_neox) {
  if (is_neox) {
    T* x2 = x + half;
    for (int64_t j = 0; j < half; ++j) {
      const float a = to_float(x[j]), b = to_float(x2[j]);
      x[j] = from_float<T>(a * cos[j] - b * sin[j]);
      x2[j] = from_float<T>(b * cos[j] + a * sin[j]);
    }
  } else {
    for (int64_t j = 0; j < half; ++j) {
      const float a = to_float(x[2 * j]), b = to_float(x[2 * j + 1]);
      x[2 * j] = from_float<T>(a * cos[j] - b * sin[j]);
      x[2 * j + 1] = from_float<T>(b * cos[j] + a * sin[j]);
    }
  }
}

template <typename T>
void rotate_token(T* query, T* key, int64_t t, const float* cos,
                  const float* sin, const RotaryLayout& l) {
  const int64_t half = l.rotary_dim / 2;
  for (int64_t h = 0; h < l.num_q_heads; ++h)
    rotate_head(query + t * l.q_token_stride + h * l.q_head_stride, cos, sin,
                half, l.is_neox);
  for (int64_t h = 0; h < l.num_k_heads; ++h)
    rotate_head(key + t * l.k_token_stride + h * l.k_head_stride, cos, sin,
                half, l.is_neox);
}

// Copies frequencies [j_begin, j_end) of cache row `pos` into float buffers.
template <typename C>
void load_angles(float* cos, float* sin, const C* cache, int64_t pos,
                 int64_t rotary_dim, int64_t j_begin, int64_t j_end) {
  const C* row = cache + pos * rotary_dim;
  const int64_t half = rotary_dim / 2;
  for (int64_t j = j_begin; j < j_end; ++j) {
    cos[j] = to_float(row[j]);
    sin[j] = to_float(row[half + j]);
  }
}

bool valid_position(int64_t pos, int64_t max_position) {
  return pos >= 0 && pos < max_position;
}

}  // namespace

// AVX2/AVX-512 clones picked at load time (the default x86-64 target has
// only SSE2), as in activation.cpp.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PYVLM_VECTOR_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define PYVLM_VECTOR_CLONES
#endif

template <typename T>
PYVLM_VECTOR_CLONES void rms_norm(T* out, const T* in, const T* weight, int64_t hidden, float eps,
              int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = in + r * hidden;
    const float inv = inverse_rms(sum_squares(x, hidden), hidden, eps);
    scale_row(out + r * hidden, x, weight, hidden, inv);
  }
}

template <typename T>
PYVLM_VECTOR_CLONES void fused_add_rms_norm(T* input, T* residual, const T* weight, int64_t hidden,
                        float eps, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    T* x = input + r * hidden;
    T* res = residual + r * hidden;
    add_residual(x, res, hidden);
    const float inv = inverse_rms(sum_squares(res, hidden), hidden, eps);
    scale_row(x, res, weight, hidden, inv);
  }
}

template <typename T, typename C>
PYVLM_VECTOR_CLONES void rotary_embedding(const int64_t* positions, T* query, T* key,
                      const C* cos_sin_cache, const RotaryLayout& layout,
                      int64_t token_begin, int64_t token_end) {
  const int64_t half = layout.rotary_dim / 2;
  std::vector<float> angles(2 * half);
  float* cos = angles.data();
  float* sin = cos + half;
  for (int64_t t = token_begin; t < token_end; ++t) {
    if (!valid_position(positions[t], layout.max_position)) continue;
    load_angles(cos, sin, cos_sin_cache, positions[t], layout.rotary_dim, 0,
                half);
    rotate_token(query, key, t, cos, sin, layout);
  }
}

template <typename T, typename C>
PYVLM_VECTOR_CLONES void mrope(const int64_t* positions, T* query, T* key, const C* cos_sin_cache,
           const RotaryLayout& layout, const MropeSections& sections,
           int64_t token_begin, int64_t token_end) {
  const int64_t half = layout.rotary_dim / 2;
  std::vector<float> angles(2 * half);
  float* cos = angles.data();
  float* sin = cos + half;
  for (int64_t t = token_begin; t < token_end; ++t) {
    bool valid = true;
    for (int row = 0; row < 3; ++row)
      valid = valid && valid_position(
                           positions[row * sections.positions_row_stride + t],
                           layout.max_position);
    if (!valid) continue;
    int64_t j_begin = 0;
    for (int s = 0; s < sections.num_sections; ++s) {
      const int64_t pos = positions[(s % 3) * sections.positions_row_stride + t];
      load_angles(cos, sin, cos_sin_cache, pos, layout.rotary_dim, j_begin,
                  sections.end[s]);
      j_begin = sections.end[s];
    }
    rotate_token(query, key, t, cos, sin, layout);
  }
}

void merge_rows(char* dst, int64_t dst_row_stride, int64_t num_dst_rows,
                const char* src, int64_t src_row_stride, int64_t row_bytes,
                const int64_t* positions, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    if (!valid_position(positions[i], num_dst_rows)) continue;
    std::memcpy(dst + positions[i] * dst_row_stride, src + i * src_row_stride,
                row_bytes);
  }
}

#define PYVLM_INSTANTIATE_NORMS(T)                                          \
  template void rms_norm<T>(T*, const T*, const T*, int64_t, float, int64_t, \
                            int64_t);                                        \
  template void fused_add_rms_norm<T>(T*, T*, const T*, int64_t, float,      \
                                      int64_t, int64_t);
PYVLM_INSTANTIATE_NORMS(float)
PYVLM_INSTANTIATE_NORMS(half_t)
PYVLM_INSTANTIATE_NORMS(bf16_t)

#define PYVLM_INSTANTIATE_ROTARY(T, C)                                       \
  template void rotary_embedding<T, C>(const int64_t*, T*, T*, const C*,     \
                                       const RotaryLayout&, int64_t, int64_t); \
  template void mrope<T, C>(const int64_t*, T*, T*, const C*,                \
                            const RotaryLayout&, const MropeSections&,       \
                            int64_t, int64_t);
PYVLM_INSTANTIATE_ROTARY(float, float)
PYVLM_INSTANTIATE_ROTARY(half_t, half_t)
PYVLM_INSTANTIATE_ROTARY(half_t, float)
PYVLM_INSTANTIATE_ROTARY(bf16_t, bf16_t)
PYVLM_INSTANTIATE_ROTARY(bf16_t, float)

}  // namespace pyvlm
