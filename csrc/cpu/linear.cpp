// CPU adapter for skinny_gemm: dtype dispatch and threads over output features.
#include <ATen/Parallel.h>

#include "../validate/linear.h"
#include "dispatch.h"

namespace pyvlm {
namespace {

template <typename T, typename Out>
void skinny_gemm_rows(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const SkinnyGemmShape& s) {
  const T* bias_data = bias.has_value() ? data_as<T>(*bias) : nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / (s.in_features * s.num_tokens + 1));
  at::parallel_for(0, s.out_features, grain, [&](int64_t begin, int64_t end) {
    skinny_gemm(data_as<Out>(out), data_as<T>(input), data_as<T>(weight), bias_data,
                s.num_tokens, s.in_features, s.in_stride, s.out_features, begin, end);
  });
}

void skinny_gemm_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias) {
  const SkinnyGemmShape s = check_skinny_gemm(out, input, weight, bias);
  PYVLM_CPU_DISPATCH_FLOAT(input.scalar_type(), "skinny_gemm", [&] {
    if (out.scalar_type() == input.scalar_type()) {
      skinny_gemm_rows<scalar_t, scalar_t>(out, input, weight, bias, s);
    } else {
      skinny_gemm_rows<scalar_t, float>(out, input, weight, bias, s);
    }
  });
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CPU, m) { m.impl("skinny_gemm", &pyvlm::skinny_gemm_cpu); }
