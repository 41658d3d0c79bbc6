// CUDA adapters for the LayerNorm ops: checks, dtype dispatch, stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/cuda/layer_norm.cuh"
#include "../validate/layer_norm.h"
#include "dispatch.cuh"

namespace pyvlm {
namespace {

void layer_norm_cuda(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, double epsilon) {
  const int64_t rows = check_layer_norm(out, input, weight, bias, epsilon);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYVLM_CUDA_DISPATCH_FLOAT(input.scalar_type(), "layer_norm", [&] {
    cuda::launch_layer_norm(cuda_data_as<scalar_t>(out), cuda_data_as<scalar_t>(input),
                            cuda_data_as<scalar_t>(weight), bias_data<scalar_t>(bias), rows,
                            input.size(-1), static_cast<float>(epsilon), stream);
  });
  PYVLM_CHECK_LAUNCH("layer_norm");
}

void fused_add_layer_norm_cuda(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, double epsilon) {
  const int64_t rows = check_fused_add_layer_norm(input, residual, weight, bias, epsilon);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYVLM_CUDA_DISPATCH_FLOAT(input.scalar_type(), "fused_add_layer_norm", [&] {
    cuda::launch_fused_add_layer_norm(cuda_data_as<scalar_t>(input),
                                      cuda_data_as<scalar_t>(residual),
                                      cuda_data_as<scalar_t>(weight), bias_data<scalar_t>(bias),
                                      rows, input.size(-1), static_cast<float>(epsilon), stream);
  });
  PYVLM_CHECK_LAUNCH("fused_add_layer_norm");
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CUDA, m) {
  m.impl("layer_norm", &pyvlm::layer_norm_cuda);
  m.impl("fused_add_layer_norm", &pyvlm::fused_add_layer_norm_cuda);
}
