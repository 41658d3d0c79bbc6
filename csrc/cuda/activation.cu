// CUDA adapters for the gated activations: dtype dispatch and launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/cuda/activation.cuh"
#include "../validate/activation.h"
#include "dispatch.cuh"

namespace pyvlm {
namespace {

void act_and_mul_cuda(at::Tensor& out, const at::Tensor& input, Activation act) {
  const int64_t num_tokens = check_act_and_mul(out, input);
  const int64_t d = out.size(-1);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYVLM_CUDA_DISPATCH_FLOAT(input.scalar_type(), "act_and_mul", [&] {
    cuda::launch_act_and_mul(cuda_data_as<scalar_t>(out), cuda_data_as<scalar_t>(input),
                             num_tokens, d, act, stream);
  });
  PYVLM_CHECK_LAUNCH("act_and_mul");
}

void silu_and_mul(at::Tensor& out, const at::Tensor& input) {
  act_and_mul_cuda(out, input, Activation::kSilu);
}

void gelu_and_mul(at::Tensor& out, const at::Tensor& input,
                  c10::string_view approximate) {
  act_and_mul_cuda(out, input, parse_gelu_approximate(approximate));
}

void quick_gelu_cuda(at::Tensor& out, const at::Tensor& input) {
  const int64_t n = check_quick_gelu(out, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYVLM_CUDA_DISPATCH_FLOAT(input.scalar_type(), "quick_gelu", [&] {
    cuda::launch_quick_gelu(cuda_data_as<scalar_t>(out), cuda_data_as<scalar_t>(input), n,
                            stream);
  });
  PYVLM_CHECK_LAUNCH("quick_gelu");
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CUDA, m) {
  m.impl("silu_and_mul", &pyvlm::silu_and_mul);
  m.impl("gelu_and_mul", &pyvlm::gelu_and_mul);
  m.impl("quick_gelu", &pyvlm::quick_gelu_cuda);
}
