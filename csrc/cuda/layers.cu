// CUDA adapters for the layer ops: checks, dtype dispatch, stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/cuda/layers.cuh"
#include "../validate/layers.h"
#include "dispatch.cuh"

namespace pyvlm {
namespace {

void rms_norm_cuda(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                   double epsilon) {
  const int64_t rows = check_rms_norm(out, input, weight, epsilon);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYVLM_CUDA_DISPATCH_FLOAT(input.scalar_type(), "rms_norm", [&] {
    cuda::launch_rms_norm(cuda_data_as<scalar_t>(out), cuda_data_as<scalar_t>(input),
                          cuda_data_as<scalar_t>(weight), rows, input.size(-1),
                          static_cast<float>(epsilon), stream);
  });
  PYVLM_CHECK_LAUNCH("rms_norm");
}

void fused_add_rms_norm_cuda(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                             double epsilon) {
  const int64_t rows = check_fused_add_rms_norm(input, residual, weight, epsilon);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYVLM_CUDA_DISPATCH_FLOAT(input.scalar_type(), "fused_add_rms_norm", [&] {
    cuda::launch_fused_add_rms_norm(cuda_data_as<scalar_t>(input),
                                    cuda_data_as<scalar_t>(residual),
                                    cuda_data_as<scalar_t>(weight), rows, input.size(-1),
                                    static_cast<float>(epsilon), stream);
  });
  PYVLM_CHECK_LAUNCH("fused_add_rms_norm");
}

// Calls body with the cache pointer typed float or scalar_t.
template <typename scalar_t, typename Body>
void dispatch_cache_cuda(const at::Tensor& cache, Body&& body) {
  if (cache.scalar_type() == at::kFloat) {
    body(static_cast<const float*>(cache.data_ptr()));
  } else {
    body(static_cast<const scalar_t*>(cache.data_ptr()));
  }
}

void rotary_embedding_cuda(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                           int64_t head_size, const at::Tensor& cos_sin_cache, bool is_neox) {
  const int64_t num_tokens = query.dim() > 0 ? query.size(0) : 0;
  const RotaryLayout layout =
      check_rotary_operands(query, key, head_size, cos_sin_cache, is_neox, num_tokens);
  check_positions_1d(positions, query, layout.max_position);
  check_size(positions, 0, num_tokens, "positions");
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYVLM_CUDA_DISPATCH_FLOAT(query.scalar_type(), "rotary_embedding", [&] {
    dispatch_cache_cuda<scalar_t>(cos_sin_cache, [&](auto* cache) {
      cuda::launch_rotary_embedding(positions.data_ptr<int64_t>(),
                                    cuda_data_as<scalar_t>(query), cuda_data_as<scalar_t>(key),
                                    cache, layout, num_tokens, stream);
    });
  });
  PYVLM_CHECK_LAUNCH("rotary_embedding");
}

void mrope_cuda(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                int64_t head_size, const at::Tensor& cos_sin_cache,
                at::IntArrayRef mrope_section, bool is_neox) {
  const int64_t num_tokens = query.dim() > 0 ? query.size(0) : 0;
  const RotaryLayout layout =
      check_rotary_operands(query, key, head_size, cos_sin_cache, is_neox, num_tokens);
  check_positions_mrope(positions, query, layout.max_position);
  check_size(positions, 1, num_tokens, "positions");
  const MropeSections sections = check_mrope_sections(mrope_section, layout.rotary_dim, positions);
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYVLM_CUDA_DISPATCH_FLOAT(query.scalar_type(), "mrope", [&] {
    dispatch_cache_cuda<scalar_t>(cos_sin_cache, [&](auto* cache) {
      cuda::launch_mrope(positions.data_ptr<int64_t>(), cuda_data_as<scalar_t>(query),
                         cuda_data_as<scalar_t>(key), cache, layout, sections, num_tokens,
                         stream);
    });
  });
  PYVLM_CHECK_LAUNCH("mrope");
}

void merge_multimodal_embeddings_cuda(at::Tensor& inputs_embeds, const at::Tensor& mm_embeds,
                                      const at::Tensor& positions) {
  check_merge(inputs_embeds, mm_embeds, positions);
  const int64_t elem = inputs_embeds.element_size();
  const c10::cuda::CUDAGuard guard(inputs_embeds.device());
  cuda::launch_merge_rows(static_cast<char*>(inputs_embeds.data_ptr()),
                          inputs_embeds.stride(0) * elem, inputs_embeds.size(0),
                          static_cast<const char*>(mm_embeds.data_ptr()),
                          mm_embeds.stride(0) * elem, inputs_embeds.size(1) * elem,
                          positions.data_ptr<int64_t>(), mm_embeds.size(0),
                          c10::cuda::getCurrentCUDAStream());
  PYVLM_CHECK_LAUNCH("merge_multimodal_embeddings");
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CUDA, m) {
  m.impl("rms_norm", &pyvlm::rms_norm_cuda);
  m.impl("fused_add_rms_norm", &pyvlm::fused_add_rms_norm_cuda);
  m.impl("rotary_embedding", &pyvlm::rotary_embedding_cuda);
  m.impl("mrope", &pyvlm::mrope_cuda);
  m.impl("merge_multimodal_embeddings", &pyvlm::merge_multimodal_embeddings_cuda);
}
