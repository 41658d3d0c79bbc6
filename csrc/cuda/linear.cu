// CUDA adapter for skinny_gemm: dtype dispatch and launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/cuda/linear.cuh"
#include "../validate/linear.h"
#include "dispatch.cuh"

namespace pyvlm {
namespace {

template <typename T, typename Out>
void launch(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
            const std::optional<at::Tensor>& bias, const SkinnyGemmShape& s,
            cudaStream_t stream) {
  const T* bias_data = bias.has_value() ? cuda_data_as<T>(*bias) : nullptr;
  cuda::launch_skinny_gemm(cuda_data_as<Out>(out), cuda_data_as<T>(input),
                           cuda_data_as<T>(weight), bias_data, s.num_tokens, s.in_features,
                           s.in_stride, s.out_features, stream);
}

void skinny_gemm_cuda(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias) {
  const SkinnyGemmShape s = check_skinny_gemm(out, input, weight, bias);
  if (s.num_tokens == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYVLM_CUDA_DISPATCH_FLOAT(input.scalar_type(), "skinny_gemm", [&] {
    if (out.scalar_type() == input.scalar_type()) {
      launch<scalar_t, scalar_t>(out, input, weight, bias, s, stream);
    } else {
      launch<scalar_t, float>(out, input, weight, bias, s, stream);
    }
  });
  PYVLM_CHECK_LAUNCH("skinny_gemm");
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CUDA, m) { m.impl("skinny_gemm", &pyvlm::skinny_gemm_cuda); }
