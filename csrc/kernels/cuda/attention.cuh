// CUDA paged KV cache writes and the index ranges the adapter checks;
// paged decode attention lives in decode_attention.cuh. Framework-free:
// plain pointers, sizes and a stream.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "../attention.h"
#include "common.cuh"
#include "decode_attention.cuh"

namespace pyvlm {
namespace cuda {
// Helpers live in their own namespace so that the .cu adapters can be
// compiled as one translation unit next to other groups' kernels.
namespace attention_impl {

// ---------------------------------------------------------------------------
// reshape_and_cache
// ---------------------------------------------------------------------------

// One block per token; V is the copy unit (uint4 for 16-byte vectors, or T).
template <typename T, typename V>
__global__ void reshape_and_cache_kernel(CacheWriteArgs<T> a) {
  constexpr int64_t kElems = sizeof(V) / sizeof(T);
  start_after_prerequisite_grid();
  const int64_t t = blockIdx.x;
  const int64_t slot = a.slot_mapping[t];
  // Negative slots are padding; slots past the cache are skipped too, since
  // the adapter's range check can be turned off (index checks, checks.h).
  if (slot < 0 || slot >= a.num_slots) return;
  const int64_t vecs_per_row = a.head_dim / kElems;
  const int64_t total = a.num_kv_heads * vecs_per_row;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const int64_t h = i / vecs_per_row;
    const int64_t c = (i - h * vecs_per_row) * kElems;
    const int64_t dst = (slot * a.num_kv_heads + h) * a.head_dim + c;
    *reinterpret_cast<V*>(a.key_cache + dst) = *reinterpret_cast<const V*>(
        a.key + t * a.key_stride_token + h * a.key_stride_head + c);
    *reinterpret_cast<V*>(a.value_cache + dst) = *reinterpret_cast<const V*>(
        a.value + t * a.value_stride_token + h * a.value_stride_head + c);
  }
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename T>
bool can_copy_vectors(const CacheWriteArgs<T>& a) {
  const int64_t e = 16 / sizeof(T);
  return a.head_dim % e == 0 && a.key_stride_token % e == 0 && a.key_stride_head % e == 0 &&
         a.value_stride_token % e == 0 && a.value_stride_head % e == 0 && aligned16(a.key) &&
         aligned16(a.value) && aligned16(a.key_cache) && aligned16(a.value_cache);
}

template <typename T>
void launch_reshape_and_cache(const CacheWriteArgs<T>& a, int64_t num_tokens,
                              cudaStream_t stream) {
  if (num_tokens == 0 || a.num_kv_heads == 0 || a.head_dim == 0) return;
  const bool vec = can_copy_vectors(a);
  const int64_t per_token = a.num_kv_heads * a.head_dim / (vec ? 16 / int64_t(sizeof(T)) : 1);
  const unsigned threads = static_cast<unsigned>(std::min<int64_t>(512, (per_token + 31) / 32 * 32));
  const dim3 grid(static_cast<unsigned>(num_tokens));
  if (vec) {
    launch_programmatic(reshape_and_cache_kernel<T, uint4>, grid, dim3(threads), 0, stream, a);
  } else {
    launch_programmatic(reshape_and_cache_kernel<T, T>, grid, dim3(threads), 0, stream, a);
  }
}

// ---------------------------------------------------------------------------
// Index ranges for the adapter's checks
// ---------------------------------------------------------------------------

// One block computes {min, max} of seq_lens and of the block-table entries
// the sequences use into stats[0..3], so the adapter's range check costs one
// small kernel and one 32-byte copy instead of a chain of torch ops.
__global__ void decode_index_stats_kernel(const int32_t* __restrict__ seq_lens,
                                          const int32_t* __restrict__ block_tables,
                                          int64_t table_stride, int64_t num_seqs,
                                          int64_t max_pages, int64_t page_size,
                                          long long* __restrict__ stats) {
  __shared__ long long partial[4][32];
  long long v[4] = {LLONG_MAX, LLONG_MIN, LLONG_MAX, LLONG_MIN};
  for (int64_t s = 0; s < num_seqs; ++s) {
    const long long len = seq_lens[s];
    if (threadIdx.x == 0) v[0] = min(v[0], len), v[1] = max(v[1], len);
    const long long used = min(static_cast<long long>(max_pages),
                               (max(len, 0LL) + page_size - 1) / page_size);
    for (long long i = threadIdx.x; i < used; i += blockDim.x) {
      const long long page = block_tables[s * table_stride + i];
      v[2] = min(v[2], page);
      v[3] = max(v[3], page);
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    for (int o = 16; o > 0; o >>= 1) {
      const long long other = __shfl_xor_sync(0xffffffffu, v[k], o);
      v[k] = (k % 2 == 0) ? min(v[k], other) : max(v[k], other);
    }
    if (lane == 0) partial[k][warp] = v[k];
  }
  __syncthreads();
  if (threadIdx.x < 4) {
    const int k = threadIdx.x;
    long long r = partial[k][0];
    for (int w = 1; w < int(blockDim.x >> 5); ++w)
      r = (k % 2 == 0) ? min(r, partial[k][w]) : max(r, partial[k][w]);
    stats[k] = r;
  }
}

inline void launch_decode_index_stats(const int32_t* seq_lens, const int32_t* block_tables,
                                      int64_t table_stride, int64_t num_seqs, int64_t max_pages,
                                      int64_t page_size, long long* stats, cudaStream_t stream) {
  decode_index_stats_kernel<<<1, 256, 0, stream>>>(seq_lens, block_tables, table_stride,
                                                   num_seqs, max_pages, page_size, stats);
}

}  // namespace attention_impl

using attention_impl::launch_decode_index_stats;
using attention_impl::launch_reshape_and_cache;

}  // namespace cuda
}  // namespace pyvlm
