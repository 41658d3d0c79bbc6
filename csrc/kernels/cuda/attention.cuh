// CUDA paged KV cache writes and decode attention (flash-decoding).
// Framework-free: plain pointers, sizes and a stream.
//
// Decode: one CTA per (sequence, KV head, context split) serves every query
// head of that GQA group, so each cached K/V byte is read from memory once.
// K/V tiles stream into shared memory with 16-byte cp.async copies, three
// stages deep, so two tiles are in flight while one is consumed. Thread
// (x, y, z) of a CTA owns dims [8x, 8x + 8) of query head y and the z-th
// slice of each tile's tokens; the BDX threads of a row reduce their partial
// dot products with warp shuffles, each thread keeps an fp32 online softmax
// (Milakov & Gimelshein 2018) and the z slices merge at the end. When there
// are too few (sequence, KV head) pairs to fill the GPU, the context is split
// into partitions whose partial results a second kernel merges through their
// log-sum-exps (flash-decoding, Dao et al. 2023).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../attention.h"
#include "common.cuh"

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
    reshape_and_cache_kernel<T, uint4><<<grid, threads, 0, stream>>>(a);
  } else {
    reshape_and_cache_kernel<T, T><<<grid, threads, 0, stream>>>(a);
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

// ---------------------------------------------------------------------------
// paged_attention_decode
// ---------------------------------------------------------------------------

constexpr int kDecodeStages = 3;         // cp.async pipeline depth
constexpr int kDecodeStageBytes = 16384; // K + V bytes per stage (target)
constexpr int kDecodeMaxThreads = 512;
constexpr int kDecodeMinThreads = 128;
constexpr int kDecodeMaxSplits = 256;
constexpr int kTokensPerStep = 4;        // scores per online-softmax update
constexpr int kMmaWarps = 2;             // tensor-core kernel: warps per CTA
constexpr int kMmaRows = 16;             // query heads per CTA (the mma's M)
constexpr int kMmaMaxDim = 128;          // largest head_dim of the tensor-core kernel

// Launch geometry, chosen on the host by plan_paged_decode.
struct DecodePlan {
  int bdx;              // threads per row: next power of two >= head_dim / 8
  int heads_per_cta;    // query heads of the GQA group served by one CTA
  int num_head_chunks;  // CTAs sharing one (sequence, KV head) when the group is large
  int bdz;              // token slices per tile
  int num_threads;      // bdx * heads_per_cta * bdz rounded up to whole warps
  int tile;             // tokens per pipeline stage, a multiple of 4 * bdz
  int num_splits;       // context partitions per sequence
  int row_chunks;       // 16-byte chunks per cached row
  int row_chunks_shift; // log2(row_chunks), or -1
  int page_shift;       // log2(page_size), or -1
  int smem_row_elems;   // elements per staged row (head_dim, or padded for mma)
  bool use_mma;         // tensor-core kernel (16-bit types, head_dim <= 128)
  size_t smem_bytes;
};

inline int ceil_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

inline int floor_pow2(int v) {
  int p = 1;
  while (p * 2 <= v) p <<= 1;
  return p;
}

inline int log2_if_pow2(int64_t v) {
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Split the context only while (sequence, KV head) CTAs alone would leave
// the GPU short of ~4 resident CTAs per SM, and keep >= 4 tiles per split.
inline int plan_num_splits(int64_t ctas, int64_t max_context, int tile, int num_sms) {
  int64_t splits = (4 * int64_t(num_sms)) / std::max<int64_t>(1, ctas);
  splits = std::min<int64_t>(splits, ceil_div(max_context, 4 * int64_t(tile)));
  return static_cast<int>(std::clamp<int64_t>(splits, 1, kDecodeMaxSplits));
}

// Tensor-core plan: kMmaWarps warps of 16 tokens each per tile, up to 16
// query heads (the mma's M) per CTA. Staged rows are padded to whole 16-dim
// k-steps and to an odd number of 16-byte chunks, so the 8 rows an
// ldmatrix reads fall in distinct banks.
template <typename T>
DecodePlan plan_paged_decode_mma(const PagedDecodeArgs<T>& a, int num_sms) {
  DecodePlan p{};
  const int d = static_cast<int>(a.head_dim);
  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);
  p.use_mma = true;
  p.bdx = 32;
  p.num_head_chunks = static_cast<int>(ceil_div(group, kMmaRows));
  p.heads_per_cta = static_cast<int>(ceil_div(group, p.num_head_chunks));
  p.bdz = kMmaWarps;
  p.num_threads = 32 * kMmaWarps;
  p.tile = 16 * kMmaWarps;
  p.row_chunks = d / 8;
  p.row_chunks_shift = log2_if_pow2(p.row_chunks);
  p.page_shift = log2_if_pow2(a.page_size);
  int chunks = static_cast<int>(ceil_div(d, 16)) * 2;
  if (chunks % 2 == 0) chunks += 1;
  p.smem_row_elems = chunks * 8;
  p.num_splits = plan_num_splits(a.num_seqs * a.num_kv_heads * p.num_head_chunks,
                                 a.max_pages_per_seq * a.page_size, p.tile, num_sms);
  const size_t pipeline = size_t(kDecodeStages) * 2 * p.tile * p.smem_row_elems * sizeof(T);
  const size_t merge = size_t(kMmaWarps) * kMmaRows * (kMmaMaxDim + 2) * sizeof(float);
  p.smem_bytes = std::max(pipeline, merge);
  return p;
}

// Requires head_dim % 8 == 0 and 8 <= head_dim <= 256 (checked by the
// adapter). num_sms is the device's multiprocessor count.
template <typename T>
DecodePlan plan_paged_decode(const PagedDecodeArgs<T>& a, int num_sms) {
  if constexpr (sizeof(T) == 2) {
    if (a.head_dim <= kMmaMaxDim) return plan_paged_decode_mma(a, num_sms);
  }
  DecodePlan p{};
  const int d = static_cast<int>(a.head_dim);
  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);
  p.bdx = ceil_pow2(d / 8);
  p.num_head_chunks = static_cast<int>(ceil_div(group, kDecodeMaxThreads / p.bdx));
  p.heads_per_cta = static_cast<int>(ceil_div(group, p.num_head_chunks));
  p.bdz = floor_pow2(std::max(1, kDecodeMinThreads / (p.bdx * p.heads_per_cta)));
  p.num_threads = (p.bdx * p.heads_per_cta * p.bdz + 31) / 32 * 32;
  const int row_bytes = d * static_cast<int>(sizeof(T));
  const int step = kTokensPerStep * p.bdz;
  p.tile = step * std::max(1, kDecodeStageBytes / (2 * row_bytes * step));
  p.row_chunks = row_bytes / 16;
  p.row_chunks_shift = log2_if_pow2(p.row_chunks);
  p.page_shift = log2_if_pow2(a.page_size);
  p.smem_row_elems = d;
  p.num_splits = plan_num_splits(a.num_seqs * a.num_kv_heads * p.num_head_chunks,
                                 a.max_pages_per_seq * a.page_size, p.tile, num_sms);
  const size_t pipeline = size_t(kDecodeStages) * 2 * p.tile * row_bytes;
  const size_t merge = size_t(p.bdz) * p.heads_per_cta * (d + 2) * sizeof(float);
  p.smem_bytes = std::max(pipeline, merge);
  return p;
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  // src_bytes == 0 zero-fills the 16 bytes without reading global memory.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Eight elements (16 bytes of 16-bit values, 32 of float) as floats.
__device__ __forceinline__ void load8(const float* p, float (&f)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w;
  f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&f)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);  // bf16 is the top half of a float
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void load8(const __half* p, float (&f)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __half22float2(h[i]);
    f[2 * i] = v.x, f[2 * i + 1] = v.y;
  }
}

__device__ __forceinline__ void store8(float* p, const float (&f)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}

__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&f)[8]) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = u;
}

__device__ __forceinline__ void store8(__half* p, const float (&f)[8]) {
  uint4 u;
  __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = u;
}

// Sum over the BDX consecutive lanes of a row (BDX is a power of two <= 32).
template <int BDX>
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int o = BDX / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Copies tokens [t0, t0 + tile) of one KV head into a shared-memory stage
// ([tile][head_dim] each for K and V). Tokens at or past `end` and pages
// outside the cache (possible only with index checks disabled) are
// zero-filled instead of read.
template <typename T>
__device__ __forceinline__ void load_tile(const PagedDecodeArgs<T>& a, const DecodePlan& p,
                                          const int32_t* block_table, int64_t kv_head,
                                          int64_t t0, int64_t end, T* k_stage, T* v_stage) {
  constexpr int kElems = 16 / sizeof(T);
  const int total = p.tile * p.row_chunks;
  for (int c = threadIdx.x; c < total; c += blockDim.x) {
    int tok, part;
    if (p.row_chunks_shift >= 0) {
      tok = c >> p.row_chunks_shift;
      part = c & (p.row_chunks - 1);
    } else {
      tok = c / p.row_chunks;
      part = c - tok * p.row_chunks;
    }
    const int64_t t = t0 + tok;
    const T* k_src = a.key_cache;
    const T* v_src = a.value_cache;
    int bytes = 0;
    if (t < end) {
      const int64_t page_index = p.page_shift >= 0 ? t >> p.page_shift : t / a.page_size;
      const int64_t page = __ldg(block_table + page_index);
      if (page >= 0 && page < a.num_pages) {
        const int64_t slot = page * a.page_size + (t - page_index * a.page_size);
        const int64_t offset = (slot * a.num_kv_heads + kv_head) * a.head_dim + part * kElems;
        k_src += offset;
        v_src += offset;
        bytes = 16;
      }
    }
    const int dst = tok * p.smem_row_elems + part * kElems;
    cp_async_16(k_stage + dst, k_src, bytes);
    cp_async_16(v_stage + dst, v_src, bytes);
  }
}

// Running softmax state of one thread: max and sum of exp2(score - max) over
// the tokens seen, and the matching weighted sum of its 8 dims of V.
struct SoftmaxState {
  float max = -INFINITY;
  float sum = 0.f;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
};

// Consumes one staged tile: this thread's slice of `tpz` tokens starting at
// `first`, of which those at or past `num_valid` are masked. Every thread
// of the block runs the same loop (the shuffles need whole warps).
template <int BDX, typename T>
__device__ __forceinline__ void attend_tile(const T* k_stage, const T* v_stage, int first,
                                            int tpz, int num_valid, int head_dim, int x,
                                            bool has_dims, const float (&q)[8],
                                            SoftmaxState& st) {
  for (int i0 = 0; i0 < tpz; i0 += kTokensPerStep) {
    float s[kTokensPerStep];
#pragma unroll
    for (int j = 0; j < kTokensPerStep; ++j) {
      const int tok = first + i0 + j;
      float part = 0.f;
      if (has_dims) {
        float k[8];
        load8(k_stage + tok * head_dim + x * 8, k);
#pragma unroll
        for (int e = 0; e < 8; ++e) part = fmaf(q[e], k[e], part);
      }
      s[j] = row_sum<BDX>(part);
      if (tok >= num_valid) s[j] = -INFINITY;
    }
    float m = st.max;
#pragma unroll
    for (int j = 0; j < kTokensPerStep; ++j) m = fmaxf(m, s[j]);
    // While every score so far is masked (m == -inf) nothing accumulates.
    const float alpha = m == -INFINITY ? 1.f : exp2f(st.max - m);
    float w[kTokensPerStep];
    float total = 0.f;
#pragma unroll
    for (int j = 0; j < kTokensPerStep; ++j) {
      w[j] = s[j] == -INFINITY ? 0.f : exp2f(s[j] - m);
      total += w[j];
    }
    st.max = m;
    st.sum = st.sum * alpha + total;
#pragma unroll
    for (int e = 0; e < 8; ++e) st.acc[e] *= alpha;
    if (has_dims) {
#pragma unroll
      for (int j = 0; j < kTokensPerStep; ++j) {
        float v[8];
        load8(v_stage + (first + i0 + j) * head_dim + x * 8, v);
#pragma unroll
        for (int e = 0; e < 8; ++e) st.acc[e] = fmaf(w[j], v[e], st.acc[e]);
      }
    }
  }
}

// Combines the bdz token slices of each head through shared memory (which
// the pipeline no longer uses); thread z == 0 ends with the merged state.
__device__ __forceinline__ void merge_slices(const DecodePlan& p, float* smem, int x, int y,
                                             int z, int head_dim, bool has_dims,
                                             SoftmaxState& st) {
  if (p.bdz == 1) return;
  const int hp = p.heads_per_cta;
  float* acc = smem;                                // [bdz][hp][head_dim]
  float* stats = smem + p.bdz * hp * head_dim;      // [bdz][hp][2]
  if (z < p.bdz) {
    if (has_dims) {
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[(z * hp + y) * head_dim + x * 8 + e] = st.acc[e];
    }
    if (x == 0) {
      stats[(z * hp + y) * 2] = st.max;
      stats[(z * hp + y) * 2 + 1] = st.sum;
    }
  }
  __syncthreads();
  if (z != 0) return;
  float m = -INFINITY;
  for (int zi = 0; zi < p.bdz; ++zi) m = fmaxf(m, stats[(zi * hp + y) * 2]);
  SoftmaxState merged;
  merged.max = m;
  for (int zi = 0; zi < p.bdz; ++zi) {
    const float mz = stats[(zi * hp + y) * 2];
    const float w = mz == -INFINITY ? 0.f : exp2f(mz - m);
    merged.sum += w * stats[(zi * hp + y) * 2 + 1];
    if (has_dims) {
#pragma unroll
      for (int e = 0; e < 8; ++e) merged.acc[e] += w * acc[(zi * hp + y) * head_dim + x * 8 + e];
    }
  }
  st = merged;
}

// The `1` lets ptxas use up to 128 registers (without it, it capped at 64
// and spilled the unrolled K/V loads).
// What one CTA computes: (sequence, KV head, head chunk, context split) and
// the token range [start, end) of its partition.
struct DecodeWork {
  int64_t seq, kv_head, start, end;
  int chunk, split;
};

template <typename T>
__device__ __forceinline__ DecodeWork decode_work(const PagedDecodeArgs<T>& a, const DecodePlan& p) {
  DecodeWork w;
  int64_t flat = blockIdx.x;
  w.chunk = static_cast<int>(flat % p.num_head_chunks);
  flat /= p.num_head_chunks;
  w.kv_head = flat % a.num_kv_heads;
  w.seq = flat / a.num_kv_heads;
  w.split = blockIdx.y;
  // Clamped so unchecked indices (index checks off) never read past
  // the block table.
  const int64_t seq_len =
      min(max(int64_t(a.seq_lens[w.seq]), int64_t(0)), a.max_pages_per_seq * a.page_size);
  const int64_t tiles_per_split = ceil_div(ceil_div(seq_len, p.tile), p.num_splits);
  w.start = w.split * tiles_per_split * p.tile;
  w.end = min(seq_len, w.start + tiles_per_split * p.tile);
  return w;
}

// Cooperative K/V pipeline over the CTA's partition: kDecodeStages - 1
// tiles in flight while `consume(k_stage, v_stage, tile_start, num_valid)`
// reads the oldest. Every thread of the block must call it.
template <typename T, typename Consume>
__device__ __forceinline__ void stream_tiles(const PagedDecodeArgs<T>& a, const DecodePlan& p,
                                             const DecodeWork& w, T* k_smem, T* v_smem,
                                             Consume&& consume) {
  const int32_t* block_table = a.block_tables + w.seq * a.block_table_stride;
  const int stage_elems = p.tile * p.smem_row_elems;
  if (w.start < w.end) {  // uniform over the block
    const int num_tiles = static_cast<int>(ceil_div(w.end - w.start, p.tile));
#pragma unroll
    for (int s = 0; s < kDecodeStages - 1; ++s) {
      if (s < num_tiles)
        load_tile(a, p, block_table, w.kv_head, w.start + int64_t(s) * p.tile, w.end,
                  k_smem + s * stage_elems, v_smem + s * stage_elems);
      cp_async_commit();
    }
    for (int j = 0; j < num_tiles; ++j) {
      const int next = j + kDecodeStages - 1;
      if (next < num_tiles) {
        const int stage = next % kDecodeStages;
        load_tile(a, p, block_table, w.kv_head, w.start + int64_t(next) * p.tile, w.end,
                  k_smem + stage * stage_elems, v_smem + stage * stage_elems);
      }
      cp_async_commit();
      cp_async_wait<kDecodeStages - 1>();  // tile j has landed (this thread's copies)
      __syncthreads();                     // ... and everyone else's
      const int stage = j % kDecodeStages;
      const int64_t t0 = w.start + int64_t(j) * p.tile;
      consume(k_smem + stage * stage_elems, v_smem + stage * stage_elems,
              static_cast<int>(min(int64_t(p.tile), w.end - t0)));
      __syncthreads();  // the stage is refilled next iteration
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // shared memory is free for the final merge
}

template <typename T, int BDX>
__global__ void __launch_bounds__(kDecodeMaxThreads, 1)
    paged_decode_kernel(PagedDecodeArgs<T> a, DecodePlan p, float* __restrict__ part_out,
                        float* __restrict__ part_lse) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DecodeWork w = decode_work(a, p);
  const int d = static_cast<int>(a.head_dim);
  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);
  const int x = threadIdx.x & (BDX - 1);
  const int yz = threadIdx.x / BDX;
  const int y = yz % p.heads_per_cta;
  const int z = yz / p.heads_per_cta;
  const int head_in_group = w.chunk * p.heads_per_cta + y;
  const bool has_dims = x * 8 < d;
  // Padding threads (z >= bdz, or heads past the group in the last chunk)
  // compute on a real row so every warp stays whole, but write nothing.
  const int zz = min(z, p.bdz - 1);
  const int64_t head = w.kv_head * group + min(head_in_group, group - 1);
  const int64_t seq = w.seq;
  const int split = w.split;

  float q[8];
  const float q_scale = a.scale * 1.4426950408889634f;  // scores in log2 units
  const T* q_row = a.query + seq * a.query_stride_seq + head * a.query_stride_head + x * 8;
#pragma unroll
  for (int e = 0; e < 8; ++e) q[e] = has_dims ? to_float(q_row[e]) * q_scale : 0.f;

  SoftmaxState st;
  T* k_smem = reinterpret_cast<T*>(smem_raw);
  T* v_smem = k_smem + kDecodeStages * p.tile * d;
  const int tpz = p.tile / p.bdz;
  stream_tiles(a, p, w, k_smem, v_smem, [&](const T* k_stage, const T* v_stage, int num_valid) {
    attend_tile<BDX>(k_stage, v_stage, zz * tpz, tpz, num_valid, d, x, has_dims, q, st);
  });
  merge_slices(p, reinterpret_cast<float*>(smem_raw), x, y, z, d, has_dims, st);

  if (z != 0 || head_in_group >= group || !has_dims) return;
  const int64_t row = seq * a.num_heads + head;
  const float inv = st.sum > 0.f ? 1.f / st.sum : 0.f;  // empty context -> zeros
  float o[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] = st.acc[e] * inv;
  if (p.num_splits == 1) {
    store8(a.out + row * d + x * 8, o);
    return;
  }
  const int64_t part_row = row * p.num_splits + split;
  store8(part_out + part_row * d + x * 8, o);
  if (x == 0) part_lse[part_row] = st.sum > 0.f ? st.max + log2f(st.sum) : -INFINITY;
}

// ---- Tensor-core decode (16-bit types, head_dim <= 128) -------------------
// The GQA group's query heads are the M = 16 rows of mma.m16n8k16 (FA2's
// packing of heads for decode): S = Q K^T and O += P V run on tensor cores
// in fp32 accumulators, with K and V fed by ldmatrix from the staged tile.
// Each warp owns 16 tokens of every tile; P is rounded to the input type
// for the second product, as in FlashAttention.

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// Query rows as mma A fragments: register r of k-step kk holds row
// g + 8 * (r & 1), dims kk * 16 + 2t + 8 * (r >> 1) and the next one, for
// lane = 4g + t. Rows past the CTA's heads and dims past head_dim are zero.
template <typename T, int DP>
__device__ __forceinline__ void load_query_fragments(const PagedDecodeArgs<T>& a, int64_t seq,
                                                     int64_t first_head, int num_rows,
                                                     uint32_t (&qa)[DP / 16][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r & 1);
      const int col = kk * 16 + 2 * t + 8 * (r >> 1);
      T pair[2] = {from_float<T>(0.f), from_float<T>(0.f)};
      if (row < num_rows && col < a.head_dim) {
        const T* src = a.query + seq * a.query_stride_seq +
                       (first_head + row) * a.query_stride_head + col;
        pair[0] = src[0];
        pair[1] = src[1];
      }
      qa[kk][r] = *reinterpret_cast<const uint32_t*>(pair);
    }
  }
}

// Per-thread online-softmax state of the tensor-core kernel: rows g and
// g + 8 of the warp's 16 x head_dim output (sum is this thread's partial).
template <int DP>
struct MmaState {
  float o[DP / 8][4];
  float max[2];
  float sum[2];
};

// One warp's 16 tokens [tok0, tok0 + 16) of a staged tile.
template <typename T, int DP>
__device__ __forceinline__ void attend_tile_mma(const T* k_stage, const T* v_stage,
                                                int row_elems, int tok0, int num_valid,
                                                int head_dim, float scale_log2,
                                                const uint32_t (&qa)[DP / 16][4],
                                                MmaState<DP>& st) {
  const int lane = threadIdx.x & 31, t = lane & 3;
  float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  const int k_steps = (head_dim + 15) / 16;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    if (kk < k_steps) {
      uint32_t b[4];
      const int row = tok0 + (lane & 7) + (lane >> 4) * 8;
      const int col = kk * 16 + ((lane >> 3) & 1) * 8;
      ldmatrix_x4(b, k_stage + row * row_elems + col);
      mma_16816<T>(s[0], qa[kk], b[0], b[1]);
      mma_16816<T>(s[1], qa[kk], b[2], b[3]);
    }
  }
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tok = tok0 + nt * 8 + 2 * t + (i & 1);
      s[nt][i] = tok < num_valid ? s[nt][i] * scale_log2 : -INFINITY;
      mx[i >> 1] = fmaxf(mx[i >> 1], s[nt][i]);
    }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // A row's 16 scores sit in the 4 lanes of a quad.
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m = fmaxf(st.max[r], mx[r]);
    const float alpha = m == -INFINITY ? 1.f : exp2f(st.max[r] - m);
    st.max[r] = m;
    st.sum[r] *= alpha;
#pragma unroll
    for (int nt = 0; nt < DP / 8; ++nt) {
      st.o[nt][2 * r] *= alpha;
      st.o[nt][2 * r + 1] *= alpha;
    }
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = i >> 1;
      s[nt][i] = s[nt][i] == -INFINITY ? 0.f : exp2f(s[nt][i] - st.max[r]);
      st.sum[r] += s[nt][i];
    }
  // The score accumulators' layout is the A fragment layout of P (k = token).
  const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                          pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
  const int n_tiles = head_dim / 8;
#pragma unroll
  for (int np = 0; np < DP / 16; ++np) {
    if (2 * np < n_tiles) {
      uint32_t b[4];
      const int row = tok0 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const int col = np * 16 + (lane >> 4) * 8;
      ldmatrix_x4_trans(b, v_stage + row * row_elems + col);
      mma_16816<T>(st.o[2 * np], pa, b[0], b[1]);
      if (2 * np + 1 < n_tiles) mma_16816<T>(st.o[2 * np + 1], pa, b[2], b[3]);
    }
  }
}

// Staged rows are padded past head_dim; the padding is read by the last
// k-step (times zero queries) and must not hold NaN garbage.
template <typename T>
__device__ __forceinline__ void zero_row_padding(T* smem, int num_rows, const DecodePlan& p,
                                                 int head_dim) {
  const int first = head_dim / 8, per_row = p.smem_row_elems / 8 - first;
  for (int i = threadIdx.x; i < num_rows * per_row; i += blockDim.x) {
    const int row = i / per_row, chunk = first + i % per_row;
    *reinterpret_cast<uint4*>(smem + row * p.smem_row_elems + chunk * 8) = make_uint4(0, 0, 0, 0);
  }
}

// Merges the warps' states through shared memory and writes each row of
// the CTA's heads: normalized to out, or as a partial with its lse.
template <typename T, int DP>
__device__ __forceinline__ void finish_mma(const PagedDecodeArgs<T>& a, const DecodePlan& p,
                                           const DecodeWork& w, int64_t first_head,
                                           int num_rows, MmaState<DP>& st, float* smem,
                                           float* part_out, float* part_lse) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int d = static_cast<int>(a.head_dim), n_tiles = d / 8;
  float* o_smem = smem;                                      // [warps][16][DP]
  float* stats = smem + kMmaWarps * kMmaRows * kMmaMaxDim;  // [warps][16][2]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st.sum[r] += __shfl_xor_sync(0xffffffffu, st.sum[r], 1);
    st.sum[r] += __shfl_xor_sync(0xffffffffu, st.sum[r], 2);
    const int row = g + 8 * r;
#pragma unroll
    for (int nt = 0; nt < DP / 8; ++nt) {
      if (nt < n_tiles) {
        float* dst = o_smem + (warp * kMmaRows + row) * kMmaMaxDim + nt * 8 + 2 * t;
        dst[0] = st.o[nt][2 * r];
        dst[1] = st.o[nt][2 * r + 1];
      }
    }
    if (t == 0) {
      stats[(warp * kMmaRows + row) * 2] = st.max[r];
      stats[(warp * kMmaRows + row) * 2 + 1] = st.sum[r];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < num_rows * n_tiles; i += blockDim.x) {
    const int row = i / n_tiles, c = i % n_tiles;
    float m = -INFINITY;
    for (int wi = 0; wi < kMmaWarps; ++wi) m = fmaxf(m, stats[(wi * kMmaRows + row) * 2]);
    float total = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int wi = 0; wi < kMmaWarps; ++wi) {
      const float mw = stats[(wi * kMmaRows + row) * 2];
      const float scale = mw == -INFINITY ? 0.f : exp2f(mw - m);
      total += scale * stats[(wi * kMmaRows + row) * 2 + 1];
      const float* src = o_smem + (wi * kMmaRows + row) * kMmaMaxDim + c * 8;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] += scale * src[e];
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;  // empty context -> zeros
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] *= inv;
    const int64_t out_row = w.seq * a.num_heads + first_head + row;
    if (p.num_splits == 1) {
      store8(a.out + out_row * d + c * 8, o);
    } else {
      const int64_t part_row = out_row * p.num_splits + w.split;
      store8(part_out + part_row * d + c * 8, o);
      if (c == 0) part_lse[part_row] = total > 0.f ? m + log2f(total) : -INFINITY;
    }
  }
}

template <typename T, int DP>
__global__ void __launch_bounds__(32 * kMmaWarps, 1)
    paged_decode_mma_kernel(PagedDecodeArgs<T> a, DecodePlan p, float* __restrict__ part_out,
                            float* __restrict__ part_lse) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DecodeWork w = decode_work(a, p);
  const int d = static_cast<int>(a.head_dim);
  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);
  const int first_in_group = w.chunk * p.heads_per_cta;
  const int num_rows = min(p.heads_per_cta, group - first_in_group);
  const int64_t first_head = w.kv_head * group + first_in_group;

  uint32_t qa[DP / 16][4];
  load_query_fragments<T, DP>(a, w.seq, first_head, num_rows, qa);
  MmaState<DP> st;
#pragma unroll
  for (int nt = 0; nt < DP / 8; ++nt) st.o[nt][0] = st.o[nt][1] = st.o[nt][2] = st.o[nt][3] = 0.f;
  st.max[0] = st.max[1] = -INFINITY;
  st.sum[0] = st.sum[1] = 0.f;

  T* k_smem = reinterpret_cast<T*>(smem_raw);
  T* v_smem = k_smem + kDecodeStages * p.tile * p.smem_row_elems;
  zero_row_padding(k_smem, 2 * kDecodeStages * p.tile, p, d);  // K and V stages are adjacent
  const float scale_log2 = a.scale * 1.4426950408889634f;
  const int tok0 = (threadIdx.x >> 5) * 16;
  stream_tiles(a, p, w, k_smem, v_smem, [&](const T* k_stage, const T* v_stage, int num_valid) {
    attend_tile_mma<T, DP>(k_stage, v_stage, p.smem_row_elems, tok0, num_valid, d, scale_log2,
                           qa, st);
  });
  finish_mma<T, DP>(a, p, w, first_head, num_rows, st, reinterpret_cast<float*>(smem_raw),
                    part_out, part_lse);
}

// Second pass of split-K: out[row] = sum_i 2^(lse_i - lse) o_i over the
// partitions of each (sequence, head) row. One block of 128 per row.
template <typename T>
__global__ void merge_splits_kernel(T* __restrict__ out, const float* __restrict__ part_out,
                                    const float* __restrict__ part_lse, int num_splits,
                                    int head_dim) {
  __shared__ float weight[kDecodeMaxSplits];
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const float* lse = part_lse + row * num_splits;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < num_splits; i += blockDim.x) m = fmaxf(m, lse[i]);
  m = block_max(m, scratch);
  float total = 0.f;
  for (int i = threadIdx.x; i < num_splits; i += blockDim.x) {
    const float w = lse[i] == -INFINITY ? 0.f : exp2f(lse[i] - m);
    weight[i] = w;
    total += w;
  }
  total = block_sum(total, scratch);  // its barriers also publish `weight`
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const float* parts = part_out + row * num_splits * head_dim;
  for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
    float o = 0.f;
    for (int i = 0; i < num_splits; ++i)
      if (weight[i] != 0.f) o += weight[i] * parts[int64_t(i) * head_dim + e];
    out[row * head_dim + e] = from_float<T>(o * inv);
  }
}

template <typename Kernel, typename T>
void launch_decode_kernel(Kernel kernel, const PagedDecodeArgs<T>& a, const DecodePlan& p,
                          float* part_out, float* part_lse, cudaStream_t stream) {
  if (p.smem_bytes > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(p.smem_bytes));
  const dim3 grid(static_cast<unsigned>(a.num_seqs * a.num_kv_heads * p.num_head_chunks),
                  static_cast<unsigned>(p.num_splits));
  kernel<<<grid, p.num_threads, p.smem_bytes, stream>>>(a, p, part_out, part_lse);
  if (p.num_splits > 1)
    merge_splits_kernel<T><<<static_cast<unsigned>(a.num_seqs * a.num_heads), 128, 0, stream>>>(
        a.out, part_out, part_lse, p.num_splits, static_cast<int>(a.head_dim));
}

template <typename T>
void launch_paged_decode_simt(const PagedDecodeArgs<T>& a, const DecodePlan& p,
                              float* part_out, float* part_lse, cudaStream_t stream) {
  switch (p.bdx) {
    case 1: return launch_decode_kernel(paged_decode_kernel<T, 1>, a, p, part_out, part_lse, stream);
    case 2: return launch_decode_kernel(paged_decode_kernel<T, 2>, a, p, part_out, part_lse, stream);
    case 4: return launch_decode_kernel(paged_decode_kernel<T, 4>, a, p, part_out, part_lse, stream);
    case 8: return launch_decode_kernel(paged_decode_kernel<T, 8>, a, p, part_out, part_lse, stream);
    case 16: return launch_decode_kernel(paged_decode_kernel<T, 16>, a, p, part_out, part_lse, stream);
    default: return launch_decode_kernel(paged_decode_kernel<T, 32>, a, p, part_out, part_lse, stream);
  }
}

// part_out / part_lse: float workspaces of num_seqs * num_heads *
// p.num_splits * head_dim and num_seqs * num_heads * p.num_splits elements,
// needed only when p.num_splits > 1. Pointers of out and the caches must be
// 16-byte aligned.
template <typename T>
void launch_paged_attention_decode(const PagedDecodeArgs<T>& a, const DecodePlan& p,
                                   float* part_out, float* part_lse, cudaStream_t stream) {
  if (a.num_seqs == 0 || a.num_heads == 0) return;
  if constexpr (sizeof(T) == 2) {
    if (p.use_mma) {
      if (a.head_dim <= 64)
        return launch_decode_kernel(paged_decode_mma_kernel<T, 64>, a, p, part_out, part_lse, stream);
      return launch_decode_kernel(paged_decode_mma_kernel<T, 128>, a, p, part_out, part_lse, stream);
    }
  }
  launch_paged_decode_simt(a, p, part_out, part_lse, stream);
}

}  // namespace attention_impl

using attention_impl::DecodePlan;
using attention_impl::launch_decode_index_stats;
using attention_impl::launch_paged_attention_decode;
using attention_impl::launch_reshape_and_cache;
using attention_impl::plan_paged_decode;

}  // namespace cuda
}  // namespace pyvlm
