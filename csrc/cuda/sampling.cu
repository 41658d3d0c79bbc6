// CUDA adapters for sample and apply_penalties: checks, dtype dispatch and
// launch on the current stream. No host sync (see csrc/validate/sampling.h
// for what is therefore not validated on CUDA).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/cuda/sampling.cuh"
#include "../validate/sampling.h"
#include "dispatch.cuh"

namespace pyvlm {
namespace {

void sample_cuda(at::Tensor& out_tokens, at::Tensor& out_logprobs, at::Tensor& out_top_ids,
                 at::Tensor& out_top_logprobs, const at::Tensor& logits,
                 const at::Tensor& temperatures, const at::Tensor& top_ks,
                 const at::Tensor& top_ps, const at::Tensor& min_ps, const at::Tensor& seeds,
                 const at::Tensor& steps) {
  const int64_t num_top = check_sample(out_tokens, out_logprobs, out_top_ids, out_top_logprobs,
                                       logits, temperatures, top_ks, top_ps, min_ps, seeds,
                                       steps);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const SamplingParams params{temperatures.data_ptr<float>(), top_ks.data_ptr<int32_t>(),
                              top_ps.data_ptr<float>(),       min_ps.data_ptr<float>(),
                              seeds.data_ptr<int64_t>(),      steps.data_ptr<int64_t>()};
  const SampleOutputs out{out_tokens.data_ptr<int64_t>(), out_logprobs.data_ptr<float>(),
                          out_top_ids.data_ptr<int64_t>(), out_top_logprobs.data_ptr<float>(),
                          num_top};
  PYVLM_CUDA_DISPATCH_FLOAT(logits.scalar_type(), "sample", [&] {
    const cudaError_t err = cuda::sampling::launch_sample(cuda_data_as<const scalar_t>(logits),
                                                          batch, vocab, params, out, stream);
    TORCH_CHECK(err == cudaSuccess, "sample launch failed: ", cudaGetErrorString(err));
  });
}

void apply_penalties_cuda(at::Tensor& logits, const at::Tensor& token_ids,
                          const at::Tensor& output_counts, const at::Tensor& cu_token_rows,
                          const at::Tensor& presence_penalties,
                          const at::Tensor& frequency_penalties,
                          const at::Tensor& repetition_penalties,
                          const at::Tensor& bias_token_ids, const at::Tensor& bias_values,
                          const at::Tensor& cu_bias_rows) {
  check_apply_penalties(logits, token_ids, output_counts, cu_token_rows, presence_penalties,
                        frequency_penalties, repetition_penalties, bias_token_ids, bias_values,
                        cu_bias_rows);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const PenaltyParams p{token_ids.data_ptr<int64_t>(),      output_counts.data_ptr<int32_t>(),
                        cu_token_rows.data_ptr<int32_t>(),  presence_penalties.data_ptr<float>(),
                        frequency_penalties.data_ptr<float>(),
                        repetition_penalties.data_ptr<float>(), bias_token_ids.data_ptr<int64_t>(),
                        bias_values.data_ptr<float>(),      cu_bias_rows.data_ptr<int32_t>()};
  PYVLM_CUDA_DISPATCH_FLOAT(logits.scalar_type(), "apply_penalties", [&] {
    const cudaError_t err = cuda::sampling::launch_apply_penalties(
        cuda_data_as<scalar_t>(logits), batch, vocab, token_ids.size(0), bias_token_ids.size(0),
        p, stream);
    TORCH_CHECK(err == cudaSuccess, "apply_penalties launch failed: ", cudaGetErrorString(err));
  });
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CUDA, m) {
  m.impl("sample", &pyvlm::sample_cuda);
  m.impl("apply_penalties", &pyvlm::apply_penalties_cuda);
}
