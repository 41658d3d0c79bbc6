// Transformer layer kernels: RMS norms (Hugging Face rounding order), rotary
// position embeddings (vLLM layout, plain and Qwen2-VL multimodal) and the
// multimodal embedding merge.
#pragma once
#include <cstdint>

namespace pyvlm {

// Rows [row_begin, row_end) of contiguous [rows, hidden] tensors, as
// LlamaRMSNorm: y = round(x * rsqrt(mean(x^2) + eps)), out = round(w * y),
// everything in float32. `out` may alias `in`.
template <typename T>
void rms_norm(T* out, const T* in, const T* weight, int64_t hidden, float eps,
              int64_t row_begin, int64_t row_end);

// residual = round(input + residual); input = rms_norm(residual) as above.
template <typename T>
void fused_add_rms_norm(T* input, T* residual, const T* weight, int64_t hidden,
                        float eps, int64_t row_begin, int64_t row_end);

// Layout of the query and key heads a rotary embedding rotates in place.
// Strides are in elements; each head's head_size elements are contiguous.
struct RotaryLayout {
  int64_t num_q_heads, q_token_stride, q_head_stride;
  int64_t num_k_heads, k_token_stride, k_head_stride;
  int64_t rotary_dim;    // even, <= head_size; the rest of a head is kept
  int64_t max_position;  // rows of cos_sin_cache [max_position, rotary_dim]
  bool is_neox;          // pairs (j, j + rotary_dim / 2), else (2j, 2j + 1)
};

// Qwen2-VL mrope: frequency j < end[0] takes position row 0 (t), j < end[1]
// row 1 (h), ... section s uses row s % 3, as transformers'
// recomposition of mrope_section.
constexpr int kMaxMropeSections = 8;
struct MropeSections {
  int num_sections;
  int64_t end[kMaxMropeSections];  // cumulative, end[num_sections-1] = rotary_dim/2
  int64_t positions_row_stride;    // between the t, h and w rows
};

// Tokens [token_begin, token_end); positions int64 [num_tokens]. C (the
// cache type) is float or T. Tokens with an out-of-range position are left
// untouched.
template <typename T, typename C>
void rotary_embedding(const int64_t* positions, T* query, T* key,
                      const C* cos_sin_cache, const RotaryLayout& layout,
                      int64_t token_begin, int64_t token_end);

// positions int64 [3, *] with row stride sections.positions_row_stride.
template <typename T, typename C>
void mrope(const int64_t* positions, T* query, T* key, const C* cos_sin_cache,
           const RotaryLayout& layout, const MropeSections& sections,
           int64_t token_begin, int64_t token_end);

// dst row positions[i] = src row i for i in [begin, end); strides and the
// row length in bytes. Rows with a position outside [0, num_dst_rows) are
// skipped.
void merge_rows(char* dst, int64_t dst_row_stride, int64_t num_dst_rows,
                const char* src, int64_t src_row_stride, int64_t row_bytes,
                const int64_t* positions, int64_t begin, int64_t end);

}  // namespace pyvlm
