// CUDA adapters for paged_attention_prefill and varlen_attention: checks,
// dtype dispatch and launch on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../kernels/cuda/attention_sm90.cuh"
#include "../kernels/cuda/prefill.cuh"
#include "../validate/prefill.h"
#include "dispatch.cuh"

namespace pyvlm {
namespace {

constexpr double kLog2e = 1.4426950408889634;

// The CUDA kernels tile head_dim in 8-element (16-byte) chunks.
void check_cuda_head_dim(int64_t head_dim) {
  TORCH_CHECK_VALUE(head_dim % 8 == 0 && head_dim >= 8 && head_dim <= 256,
                    "query's head_dim must be a multiple of 8 in [8, 256] on CUDA, got ",
                    head_dim);
}

template <typename T>
void check_cuda_grid(int64_t max_seqlen_q) {
  constexpr int rows = cuda::attention_rows_per_block<T>();
  TORCH_CHECK_VALUE((max_seqlen_q + rows - 1) / rows <= 65535, "max_seqlen_q must be <= ",
                    int64_t(65535) * rows, " on CUDA, got ", max_seqlen_q);
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Rows start 16-byte aligned when the base is and the strides are whole
// 16-byte chunks (head_dim, a multiple of 8, always is).
bool rows_aligned16(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  return aligned16(t) && t.stride(0) % vec == 0 && t.stride(1) % vec == 0;
}

template <typename T>
cuda::AttentionParams<T> common_params(at::Tensor& out, const at::Tensor& query,
                                       const at::Tensor& key, const at::Tensor& value,
                                       const at::Tensor& cu_seqlens_q, int64_t num_seqs,
                                       const AttentionDims& dims) {
  cuda::AttentionParams<T> p{};
  p.out = cuda_data_as<T>(out);
  p.query = cuda_data_as<T>(query);
  p.q_stride_token = query.stride(0);
  p.q_stride_head = query.stride(1);
  p.total_q = query.size(0);
  p.key = cuda_data_as<T>(key);
  p.value = cuda_data_as<T>(value);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.num_seqs = num_seqs;
  p.num_heads = static_cast<int>(dims.num_heads);
  p.num_kv_heads = static_cast<int>(dims.num_kv_heads);
  p.head_dim = static_cast<int>(dims.head_dim);
  p.scale_log2 = static_cast<float>(dims.scale * kLog2e);
  return p;
}

void paged_attention_prefill_cuda(at::Tensor& out, const at::Tensor& query,
                                  const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q,
                                  const at::Tensor& prefix_lens, int64_t max_seqlen_q,
                                  double scale) {
  const AttentionDims dims =
      check_paged_prefill_args(out, query, key_cache, value_cache, block_tables, cu_seqlens_q,
                               prefix_lens, max_seqlen_q, scale);
  check_cuda_head_dim(dims.head_dim);
  const c10::cuda::CUDAGuard guard(query.device());
  check_paged_prefill_indices(query, key_cache, block_tables, cu_seqlens_q, prefix_lens,
                              max_seqlen_q);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYVLM_CUDA_DISPATCH_FLOAT(query.scalar_type(), "paged_attention_prefill", [&] {
    check_cuda_grid<scalar_t>(max_seqlen_q);
    auto p = common_params<scalar_t>(out, query, key_cache, value_cache, cu_seqlens_q,
                                     block_tables.size(0), dims);
    p.total_k = key_cache.size(0) * key_cache.size(1);
    p.block_tables = block_tables.data_ptr<int32_t>();
    p.max_pages_per_seq = block_tables.size(1);
    p.page_size = key_cache.size(1);
    p.num_pages = key_cache.size(0);
    p.prefix_lens = prefix_lens.data_ptr<int32_t>();
    p.vec_ok = rows_aligned16(query) && aligned16(key_cache) && aligned16(value_cache);
    cuda::launch_attention<scalar_t, true>(p, max_seqlen_q, stream);
  });
  PYVLM_CHECK_LAUNCH("paged_attention_prefill");
}

// Which form of the wgmma kernel (attention_sm90.cuh) varlen_attention
// runs on an sm_90 device, from PYVLM_SM90_ATTENTION (read at the first
// 16-bit call on such a device): unset or 0 none (the mma.sync kernel: the
// wgmma one is opt-in until it has run on a GPU), 1 the default form (key
// tiles of 128, no overlap), bn64 / bn128 / bn64-overlap / bn128-overlap /
// bn64-x2 (two blocks an SM) a form by name (for A/B runs without a
// rebuild); anything else is an
// error. A build without sm_90a code (PYVLM_HAS_SM90A, set by setup.py)
// runs none.
enum class Sm90Form { kNone, kBn64, kBn128, kBn64Overlap, kBn128Overlap, kBn64TwoBlocks };

Sm90Form sm90_form_from(const char* value) {
  if (value == nullptr || std::strcmp(value, "0") == 0) return Sm90Form::kNone;
  if (std::strcmp(value, "1") == 0 || std::strcmp(value, "bn128") == 0) return Sm90Form::kBn128;
  if (std::strcmp(value, "bn64") == 0) return Sm90Form::kBn64;
  if (std::strcmp(value, "bn64-overlap") == 0) return Sm90Form::kBn64Overlap;
  if (std::strcmp(value, "bn128-overlap") == 0) return Sm90Form::kBn128Overlap;
  if (std::strcmp(value, "bn64-x2") == 0) return Sm90Form::kBn64TwoBlocks;
  TORCH_CHECK_VALUE(false, "PYVLM_SM90_ATTENTION must be 0, 1, bn64, bn128, bn64-overlap, ",
                    "bn128-overlap or bn64-x2, got '", value, "'");
  return Sm90Form::kNone;  // not reached: the check throws
}

Sm90Form sm90_form() {
  static const Sm90Form form = sm90_form_from(std::getenv("PYVLM_SM90_ATTENTION"));
#ifdef PYVLM_HAS_SM90A
  return form;
#else
  return Sm90Form::kNone;
#endif
}

// Launches the wgmma kernel when it takes the call; false leaves it to the
// mma.sync kernel.
template <typename T>
bool launch_sm90_varlen(const cuda::AttentionParams<T>& p, int64_t max_seqlen_q,
                        cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    int device = 0, major = 0, minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess ||
        major != 9 || minor != 0)
      return false;
    const Sm90Form form = sm90_form();
    if (form == Sm90Form::kNone || !cuda::sm90::takes(p, major, minor)) return false;
    switch (form) {
      case Sm90Form::kBn64:
        cuda::sm90::launch_varlen_attention<T, 64, false>(p, max_seqlen_q, stream);
        break;
      case Sm90Form::kBn64Overlap:
        cuda::sm90::launch_varlen_attention<T, 64, true>(p, max_seqlen_q, stream);
        break;
      case Sm90Form::kBn128Overlap:
        cuda::sm90::launch_varlen_attention<T, 128, true>(p, max_seqlen_q, stream);
        break;
      case Sm90Form::kBn64TwoBlocks:
        cuda::sm90::launch_varlen_attention<T, 64, false, 2>(p, max_seqlen_q, stream);
        break;
      default:
        cuda::sm90::launch_varlen_attention<T, 128, false>(p, max_seqlen_q, stream);
    }
    return true;
  }
}

void varlen_attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& key,
                           const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                           const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                           int64_t max_seqlen_k, double scale) {
  const AttentionDims dims = check_varlen_args(out, query, key, value, cu_seqlens_q,
                                               cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  check_cuda_head_dim(dims.head_dim);
  const c10::cuda::CUDAGuard guard(query.device());
  check_varlen_indices(query, key, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYVLM_CUDA_DISPATCH_FLOAT(query.scalar_type(), "varlen_attention", [&] {
    check_cuda_grid<scalar_t>(max_seqlen_q);
    auto p = common_params<scalar_t>(out, query, key, value, cu_seqlens_q,
                                     cu_seqlens_q.size(0) - 1, dims);
    p.k_stride_token = key.stride(0);
    p.k_stride_head = key.stride(1);
    p.v_stride_token = value.stride(0);
    p.v_stride_head = value.stride(1);
    p.total_k = key.size(0);
    p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
    p.vec_ok = rows_aligned16(query) && rows_aligned16(key) && rows_aligned16(value);
    if (!launch_sm90_varlen(p, max_seqlen_q, stream))
      cuda::launch_attention<scalar_t, false>(p, max_seqlen_q, stream);
  });
  PYVLM_CHECK_LAUNCH("varlen_attention");
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CUDA, m) {
  m.impl("paged_attention_prefill", &pyvlm::paged_attention_prefill_cuda);
  m.impl("varlen_attention", &pyvlm::varlen_attention_cuda);
}
