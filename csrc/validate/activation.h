// Argument checks for the gated activations, shared by the CPU and CUDA
// adapters.
#pragma once
#include <string>

#include "../checks.h"
#include "../kernels/activation.h"

namespace pyvlm {

inline Activation parse_gelu_approximate(c10::string_view approximate) {
  if (approximate == "none") return Activation::kGelu;
  if (approximate == "tanh") return Activation::kGeluTanh;
  TORCH_CHECK_VALUE(false, "gelu_and_mul: approximate must be 'none' or 'tanh', got '",
                    std::string(approximate), "'");
}

// A contiguous float input and a contiguous out of its dtype and device.
inline void check_elementwise_io(const at::Tensor& out, const at::Tensor& input) {
  check_float_dtype(input, "input");
  check_dtype(out, input.scalar_type(), "out");
  check_device(out, input, "out");
  check_contiguous(input, "input");
  check_contiguous(out, "out");
}

// Returns the number of tokens (rows of 2 * d inputs).
inline int64_t check_act_and_mul(const at::Tensor& out, const at::Tensor& input) {
  check_elementwise_io(out, input);
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) % 2 == 0,
                    "input's last dimension must be even, got shape ", input.sizes());
  auto expected = input.sizes().vec();
  expected.back() /= 2;
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(expected), "out must have shape ",
                    at::IntArrayRef(expected), ", got ", out.sizes());
  const int64_t d = out.size(-1);
  return d == 0 ? 0 : out.numel() / d;
}

// Returns the number of elements.
inline int64_t check_quick_gelu(const at::Tensor& out, const at::Tensor& input) {
  check_elementwise_io(out, input);
  TORCH_CHECK_VALUE(out.sizes() == input.sizes(), "out must have shape ", input.sizes(),
                    ", got ", out.sizes());
  return input.numel();
}

}  // namespace pyvlm
