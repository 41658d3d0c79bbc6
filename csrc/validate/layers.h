// Argument checks for the layer ops (RMS norms, rotary embeddings, the
// multimodal embedding merge), shared by the CPU and CUDA adapters.
#pragma once
#include <cmath>

#include "../checks.h"
#include "../kernels/layers.h"

namespace pyvlm {

inline void check_norm_weight(const at::Tensor& weight, const at::Tensor& input,
                              const char* input_name) {
  check_device(weight, input, "weight");
  check_dtype(weight, input.scalar_type(), "weight");
  check_contiguous(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == input.size(-1),
                    "weight must have shape [", input.size(-1), "] (the last dimension of ",
                    input_name, "), got ", weight.sizes());
}

inline void check_epsilon(double epsilon) {
  TORCH_CHECK_VALUE(std::isfinite(epsilon) && epsilon >= 0,
                    "epsilon must be finite and non-negative, got ", epsilon);
}

inline int64_t num_rows(const at::Tensor& t) {
  const int64_t hidden = t.size(-1);
  return hidden == 0 ? 0 : t.numel() / hidden;
}

// Returns the number of rows of `hidden` elements.
inline int64_t check_rms_norm(const at::Tensor& out, const at::Tensor& input,
                              const at::Tensor& weight, double epsilon) {
  check_float_dtype(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 1, "input must have at least 1 dimension");
  check_contiguous(input, "input");
  check_device(out, input, "out");
  check_dtype(out, input.scalar_type(), "out");
  check_contiguous(out, "out");
  TORCH_CHECK_VALUE(out.sizes() == input.sizes(), "out must have shape ", input.sizes(),
                    ", got ", out.sizes());
  check_norm_weight(weight, input, "input");
  check_epsilon(epsilon);
  return num_rows(input);
}

inline int64_t check_fused_add_rms_norm(const at::Tensor& input,
                                        const at::Tensor& residual,
                                        const at::Tensor& weight, double epsilon) {
  check_float_dtype(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 1, "input must have at least 1 dimension");
  check_contiguous(input, "input");
  check_device(residual, input, "residual");
  check_dtype(residual, input.scalar_type(), "residual");
  check_contiguous(residual, "residual");
  TORCH_CHECK_VALUE(residual.sizes() == input.sizes(), "residual must have shape ",
                    input.sizes(), ", got ", residual.sizes());
  TORCH_CHECK_VALUE(!input.is_same(residual) || input.numel() == 0,
                    "residual must not be the same tensor as input");
  check_norm_weight(weight, input, "input");
  check_epsilon(epsilon);
  return num_rows(input);
}

// Heads of `x` ([tokens, heads * head_size] or [tokens, heads, head_size],
// any token stride, contiguous last dimension): {num_heads, token_stride,
// head_stride}.
struct HeadLayout {
  int64_t num_heads, token_stride, head_stride;
};

inline HeadLayout check_heads(const at::Tensor& x, int64_t num_tokens,
                              int64_t head_size, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, name,
                    " must be [num_tokens, num_heads * head_size] or "
                    "[num_tokens, num_heads, head_size], got shape ", x.sizes());
  check_size(x, 0, num_tokens, name);
  TORCH_CHECK_VALUE(x.stride(-1) == 1 || x.size(-1) <= 1, name,
                    " must have a contiguous last dimension, got strides ", x.strides());
  HeadLayout h{0, x.stride(0), head_size};
  if (x.dim() == 2) {
    TORCH_CHECK_VALUE(x.size(1) % head_size == 0, name, ".size(1) must be a multiple of ",
                      "head_size ", head_size, ", got shape ", x.sizes());
    h.num_heads = x.size(1) / head_size;
  } else {
    check_size(x, 2, head_size, name);
    h.num_heads = x.size(1);
    if (h.num_heads > 1) h.head_stride = x.stride(1);
  }
  // Overlapping heads or tokens would be rotated twice.
  TORCH_CHECK_VALUE(h.num_heads <= 1 || h.head_stride >= head_size, name,
                    "'s heads must not overlap, got strides ", x.strides());
  TORCH_CHECK_VALUE(num_tokens <= 1 || h.num_heads == 0 ||
                        h.token_stride >= (h.num_heads - 1) * h.head_stride + head_size,
                    name, "'s tokens must not overlap, got strides ", x.strides());
  return h;
}

// Checks query, key and cos_sin_cache; positions are checked by the caller.
inline RotaryLayout check_rotary_operands(const at::Tensor& query, const at::Tensor& key,
                                          int64_t head_size,
                                          const at::Tensor& cos_sin_cache, bool is_neox,
                                          int64_t num_tokens) {
  check_float_dtype(query, "query");
  check_device(key, query, "key");
  check_dtype(key, query.scalar_type(), "key");
  TORCH_CHECK_VALUE(head_size > 0, "head_size must be positive, got ", head_size);
  const HeadLayout q = check_heads(query, num_tokens, head_size, "query");
  const HeadLayout k = check_heads(key, num_tokens, head_size, "key");
  check_device(cos_sin_cache, query, "cos_sin_cache");
  TORCH_CHECK_VALUE(cos_sin_cache.scalar_type() == at::kFloat ||
                        cos_sin_cache.scalar_type() == query.scalar_type(),
                    "cos_sin_cache must be float32 or query's dtype ", query.scalar_type(),
                    ", got ", cos_sin_cache.scalar_type());
  check_dim(cos_sin_cache, 2, "cos_sin_cache");
  check_contiguous(cos_sin_cache, "cos_sin_cache");
  const int64_t rotary_dim = cos_sin_cache.size(1);
  TORCH_CHECK_VALUE(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_size,
                    "cos_sin_cache.size(1) (rotary_dim) must be even and in [2, head_size ",
                    head_size, "], got ", rotary_dim);
  // The CUDA kernel stages one token's cos/sin in shared memory.
  TORCH_CHECK_VALUE(rotary_dim <= 8192, "cos_sin_cache.size(1) (rotary_dim) must be <= 8192, got ",
                    rotary_dim);
  // The CUDA kernel indexes a token's (head, pair) items with int.
  TORCH_CHECK_VALUE((q.num_heads + k.num_heads) * (rotary_dim / 2) < (int64_t{1} << 31),
                    "query and key have too many heads: ", q.num_heads, " + ", k.num_heads);
  return RotaryLayout{q.num_heads, q.token_stride, q.head_stride,
                      k.num_heads, k.token_stride, k.head_stride,
                      rotary_dim,  cos_sin_cache.size(0), is_neox};
}

inline int64_t check_positions_1d(const at::Tensor& positions, const at::Tensor& query,
                                  int64_t max_position) {
  check_device(positions, query, "positions");
  check_dtype(positions, at::kLong, "positions");
  check_dim(positions, 1, "positions");
  check_contiguous(positions, "positions");
  check_index_range(positions, 0, max_position, "positions");
  return positions.size(0);
}

inline int64_t check_positions_mrope(const at::Tensor& positions, const at::Tensor& query,
                                     int64_t max_position) {
  check_device(positions, query, "positions");
  check_dtype(positions, at::kLong, "positions");
  check_dim(positions, 2, "positions");
  check_size(positions, 0, 3, "positions");
  TORCH_CHECK_VALUE(positions.stride(1) == 1 || positions.size(1) <= 1,
                    "positions must have a contiguous last dimension, got strides ",
                    positions.strides());
  check_index_range(positions, 0, max_position, "positions");
  return positions.size(1);
}

inline MropeSections check_mrope_sections(at::IntArrayRef mrope_section,
                                          int64_t rotary_dim, const at::Tensor& positions) {
  const auto n = static_cast<int64_t>(mrope_section.size());
  TORCH_CHECK_VALUE(n >= 1 && n <= kMaxMropeSections, "mrope_section must have 1 to ",
                    kMaxMropeSections, " entries, got ", mrope_section);
  MropeSections s{static_cast<int>(n), {}, positions.stride(0)};
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(mrope_section[i] >= 0, "mrope_section entries must be non-negative, got ",
                      mrope_section);
    total += mrope_section[i];
    s.end[i] = total;
  }
  TORCH_CHECK_VALUE(total == rotary_dim / 2, "mrope_section must sum to rotary_dim / 2 = ",
                    rotary_dim / 2, ", got ", mrope_section);
  return s;
}

inline void check_merge(const at::Tensor& inputs_embeds, const at::Tensor& mm_embeds,
                        const at::Tensor& positions) {
  check_dim(inputs_embeds, 2, "inputs_embeds");
  check_dim(mm_embeds, 2, "mm_embeds");
  check_device(mm_embeds, inputs_embeds, "mm_embeds");
  check_dtype(mm_embeds, inputs_embeds.scalar_type(), "mm_embeds");
  TORCH_CHECK_VALUE(mm_embeds.size(1) == inputs_embeds.size(1), "mm_embeds must have ",
                    inputs_embeds.size(1), " columns (inputs_embeds' hidden size), got shape ",
                    mm_embeds.sizes());
  TORCH_CHECK_VALUE(inputs_embeds.stride(1) == 1 || inputs_embeds.size(1) <= 1,
                    "inputs_embeds must have contiguous rows, got strides ",
                    inputs_embeds.strides());
  TORCH_CHECK_VALUE(mm_embeds.stride(1) == 1 || mm_embeds.size(1) <= 1,
                    "mm_embeds must have contiguous rows, got strides ", mm_embeds.strides());
  check_device(positions, inputs_embeds, "positions");
  check_dtype(positions, at::kLong, "positions");
  check_dim(positions, 1, "positions");
  check_contiguous(positions, "positions");
  check_size(positions, 0, mm_embeds.size(0), "positions");
  check_index_range(positions, 0, inputs_embeds.size(0), "positions");
}

}  // namespace pyvlm
