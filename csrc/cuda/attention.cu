// CUDA adapters for reshape_and_cache and paged_attention_decode: checks,
// dtype dispatch, split-K workspace and launch on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/cuda/attention.cuh"
#include "../validate/attention.h"
#include "dispatch.cuh"

namespace pyvlm {
namespace {

void attention_check_aligned16(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
                    "'s data must be 16-byte aligned on CUDA");
}

void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value,
                            at::Tensor& key_cache, at::Tensor& value_cache,
                            const at::Tensor& slot_mapping) {
  check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
  const c10::cuda::CUDAGuard guard(key.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYVLM_CUDA_DISPATCH_FLOAT(key.scalar_type(), "reshape_and_cache", [&] {
    const CacheWriteArgs<scalar_t> args{
        cuda_data_as<scalar_t>(key), cuda_data_as<scalar_t>(value),
        cuda_data_as<scalar_t>(key_cache), cuda_data_as<scalar_t>(value_cache),
        slot_mapping.data_ptr<int64_t>(), key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), key.size(1), key.size(2), key_cache.size(0) * key_cache.size(1)};
    cuda::launch_reshape_and_cache(args, key.size(0), stream);
  });
  PYVLM_CHECK_LAUNCH("reshape_and_cache");
}

void check_decode_cuda_layout(const at::Tensor& out, const at::Tensor& key_cache,
                              const at::Tensor& value_cache) {
  const int64_t d = out.size(2);
  TORCH_CHECK_VALUE(d % 8 == 0 && d >= 8 && d <= 256,
                    "query: head_dim must be a multiple of 8 in [8, 256] on CUDA, got ", d);
  attention_check_aligned16(out, "out");
  attention_check_aligned16(key_cache, "key_cache");
  attention_check_aligned16(value_cache, "value_cache");
}

// One stats kernel and one device-to-host copy (the sync that turning the
// calling thread's index checks off removes; see checks.h).
void check_decode_indices_cuda(const at::Tensor& block_tables, const at::Tensor& seq_lens,
                               const at::Tensor& key_cache, cudaStream_t stream) {
  const auto stats = at::empty({4}, seq_lens.options().dtype(at::kLong));
  cuda::launch_decode_index_stats(seq_lens.data_ptr<int32_t>(), block_tables.data_ptr<int32_t>(),
                                  block_tables.stride(0), seq_lens.size(0), block_tables.size(1),
                                  key_cache.size(1),
                                  reinterpret_cast<long long*>(stats.data_ptr<int64_t>()), stream);
  PYVLM_CHECK_LAUNCH("paged_attention_decode index check");
  const auto host = stats.cpu();
  const int64_t* v = host.data_ptr<int64_t>();
  check_decode_index_stats({v[0], v[1], v[2], v[3]}, block_tables.size(1), key_cache.size(1),
                           key_cache.size(0));
}

int attention_device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&value, attr, device);
  TORCH_CHECK(err == cudaSuccess, "cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  return value;
}

// What the decode planner sizes its splits and launches from (cheap to query).
cuda::DecodeDevice decode_device(int device) {
  return {attention_device_attribute(cudaDevAttrMultiProcessorCount, device),
          attention_device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device),
          attention_device_attribute(cudaDevAttrComputeCapabilityMajor, device)};
}

void paged_attention_decode_cuda(at::Tensor& out, const at::Tensor& query,
                                 const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                 double scale) {
  check_paged_attention_decode(out, query, key_cache, value_cache, block_tables, seq_lens);
  if (out.numel() == 0) return;
  check_decode_cuda_layout(out, key_cache, value_cache);
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (index_checks_enabled()) check_decode_indices_cuda(block_tables, seq_lens, key_cache, stream);
  const cuda::DecodeDevice dev = decode_device(query.get_device());
  PYVLM_CUDA_DISPATCH_FLOAT(query.scalar_type(), "paged_attention_decode", [&] {
    const auto args = make_paged_decode_args<scalar_t>(out, query, key_cache, value_cache,
                                                 block_tables, seq_lens, scale);
    const cuda::DecodePlan plan = cuda::plan_paged_decode(args, dev);
    // Split-K partials live in the caching allocator: no sync, no cudaMalloc.
    at::Tensor part_out, part_lse;
    if (plan.num_splits > 1) {
      const auto opts = query.options().dtype(at::kFloat);
      const int64_t rows = args.num_seqs * args.num_heads * plan.num_splits;
      part_out = at::empty({rows * args.head_dim}, opts);
      part_lse = at::empty({rows}, opts);
    }
    cuda::launch_paged_attention_decode(
        args, plan, part_out.defined() ? part_out.data_ptr<float>() : nullptr,
        part_lse.defined() ? part_lse.data_ptr<float>() : nullptr, stream);
  });
  PYVLM_CHECK_LAUNCH("paged_attention_decode");
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CUDA, m) {
  m.impl("reshape_and_cache", &pyvlm::reshape_and_cache_cuda);
  m.impl("paged_attention_decode", &pyvlm::paged_attention_decode_cuda);
}
