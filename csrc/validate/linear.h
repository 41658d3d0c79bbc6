// Argument checks for skinny_gemm, shared by the CPU and CUDA adapters.
#pragma once
#include "../checks.h"
#include "../kernels/linear.h"

namespace pyvlm {

// Shapes of one skinny_gemm call.
struct SkinnyGemmShape {
  int64_t num_tokens, in_features, in_stride, out_features;
};

inline SkinnyGemmShape check_skinny_gemm(const at::Tensor& out, const at::Tensor& input,
                                         const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias) {
  check_float_dtype(input, "input");
  check_dim(input, 2, "input");
  TORCH_CHECK_VALUE(input.stride(1) == 1 || input.size(1) <= 1,
                    "input's rows must be contiguous (stride 1 along dimension 1), got strides ",
                    input.strides());
  check_device(weight, input, "weight");
  check_dtype(weight, input.scalar_type(), "weight");
  check_dim(weight, 2, "weight");
  check_contiguous(weight, "weight");
  check_size(weight, 1, input.size(1), "weight");
  check_device(out, input, "out");
  TORCH_CHECK_VALUE(out.scalar_type() == input.scalar_type() || out.scalar_type() == at::kFloat,
                    "out must have dtype ", input.scalar_type(), " or float32, got ",
                    out.scalar_type());
  check_contiguous(out, "out");
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == input.size(0) && out.size(1) == weight.size(0),
                    "out must have shape [", input.size(0), ", ", weight.size(0), "], got ",
                    out.sizes());
  if (bias.has_value()) {
    check_device(*bias, input, "bias");
    check_dtype(*bias, input.scalar_type(), "bias");
    check_contiguous(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0),
                      "bias must have shape [", weight.size(0), "], got ", bias->sizes());
  }
  const int64_t in_stride = input.size(0) > 1 ? input.stride(0) : input.size(1);
  return {input.size(0), input.size(1), in_stride, weight.size(0)};
}

}  // namespace pyvlm
