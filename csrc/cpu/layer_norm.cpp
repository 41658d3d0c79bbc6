// CPU adapters for the LayerNorm ops: dtype dispatch and threads.
#include <ATen/Parallel.h>

#include "../kernels/layer_norm.h"
#include "../validate/layer_norm.h"
#include "dispatch.h"

namespace pyvlm {
namespace {

// Rows per thread chunk so that each chunk touches at least ~16K elements.
int64_t layer_norm_grain(int64_t hidden) { return std::max<int64_t>(1, 16384 / (hidden + 1)); }

void layer_norm_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, double epsilon) {
  const int64_t rows = check_layer_norm(out, input, weight, bias, epsilon);
  const int64_t hidden = input.size(-1);
  PYVLM_CPU_DISPATCH_FLOAT(input.scalar_type(), "layer_norm", [&] {
    at::parallel_for(0, rows, layer_norm_grain(hidden), [&](int64_t begin, int64_t end) {
      layer_norm(data_as<scalar_t>(out), data_as<scalar_t>(input), data_as<scalar_t>(weight),
                 bias_data<scalar_t>(bias), hidden, static_cast<float>(epsilon), begin, end);
    });
  });
}

void fused_add_layer_norm_cpu(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, double epsilon) {
  const int64_t rows = check_fused_add_layer_norm(input, residual, weight, bias, epsilon);
  const int64_t hidden = input.size(-1);
  PYVLM_CPU_DISPATCH_FLOAT(input.scalar_type(), "fused_add_layer_norm", [&] {
    at::parallel_for(0, rows, layer_norm_grain(hidden), [&](int64_t begin, int64_t end) {
      fused_add_layer_norm(data_as<scalar_t>(input), data_as<scalar_t>(residual),
                           data_as<scalar_t>(weight), bias_data<scalar_t>(bias), hidden,
                           static_cast<float>(epsilon), begin, end);
    });
  });
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CPU, m) {
  m.impl("layer_norm", &pyvlm::layer_norm_cpu);
  m.impl("fused_add_layer_norm", &pyvlm::fused_add_layer_norm_cpu);
}
