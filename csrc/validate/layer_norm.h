// Argument checks for the LayerNorm ops, shared by the CPU and CUDA
// adapters; the same contract as the RMS norms' (validate/layers.h) plus an
// optional bias.
#pragma once
#include <optional>

#include "layers.h"

namespace pyvlm {

inline void check_norm_bias(const std::optional<at::Tensor>& bias, const at::Tensor& input) {
  if (!bias.has_value()) return;
  check_device(*bias, input, "bias");
  check_dtype(*bias, input.scalar_type(), "bias");
  check_contiguous(*bias, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == input.size(-1),
                    "bias must have shape [", input.size(-1),
                    "] (the last dimension of input), got ", bias->sizes());
}

// Returns the number of rows of `hidden` elements.
inline int64_t check_layer_norm(const at::Tensor& out, const at::Tensor& input,
                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                double epsilon) {
  const int64_t rows = check_rms_norm(out, input, weight, epsilon);
  check_norm_bias(bias, input);
  return rows;
}

inline int64_t check_fused_add_layer_norm(const at::Tensor& input, const at::Tensor& residual,
                                          const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          double epsilon) {
  const int64_t rows = check_fused_add_rms_norm(input, residual, weight, epsilon);
  check_norm_bias(bias, input);
  return rows;
}

// The bias pointer a kernel takes: null without one.
template <typename T>
const T* bias_data(const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
}

}  // namespace pyvlm
