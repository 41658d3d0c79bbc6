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
#include <cstddef>
#include <cstdint>

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
  // the adapter's range check can be disabled (PYVLM_CHECK_INDICES=0).
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
// paged_attention_decode
// ---------------------------------------------------------------------------

constexpr int kDecodeStages = 3;         // cp.async pipeline depth
constexpr int kDecodeStageBytes = 16384; // K + V bytes per stage (target)
constexpr int kDecodeMaxThreads = 512;
constexpr int kDecodeMinThreads = 128;
constexpr int kDecodeMaxSplits = 256;
constexpr int kTokensPerStep = 4;        // scores per online-softmax update

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

// Requires head_dim % 8 == 0 and 8 <= head_dim <= 256 (checked by the
// adapter). num_sms is the device's multiprocessor count.
template <typename T>
DecodePlan plan_paged_decode(const PagedDecodeArgs<T>& a, int num_sms) {
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
  // Split the context only while (sequence, KV head) CTAs alone would leave
  // the GPU short of ~4 resident CTAs per SM, and keep >= 4 tiles per split.
  const int64_t ctas = std::max<int64_t>(1, a.num_seqs * a.num_kv_heads * p.num_head_chunks);
  const int64_t max_context = a.max_pages_per_seq * a.page_size;
  int64_t splits = (4 * int64_t(num_sms)) / ctas;
  splits = std::min<int64_t>(splits, ceil_div(max_context, 4 * int64_t(p.tile)));
  p.num_splits = static_cast<int>(std::clamp<int64_t>(splits, 1, kDecodeMaxSplits));
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
    const int dst = tok * static_cast<int>(a.head_dim) + part * kElems;
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
template <typename T, int BDX>
__global__ void __launch_bounds__(kDecodeMaxThreads, 1)
    paged_decode_kernel(PagedDecodeArgs<T> a, DecodePlan p, float* __restrict__ part_out,
                        float* __restrict__ part_lse) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t flat = blockIdx.x;
  const int chunk = static_cast<int>(flat % p.num_head_chunks);
  flat /= p.num_head_chunks;
  const int64_t kv_head = flat % a.num_kv_heads;
  const int64_t seq = flat / a.num_kv_heads;
  const int split = blockIdx.y;

  const int d = static_cast<int>(a.head_dim);
  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);
  const int x = threadIdx.x & (BDX - 1);
  const int yz = threadIdx.x / BDX;
  const int y = yz % p.heads_per_cta;
  const int z = yz / p.heads_per_cta;
  const int head_in_group = chunk * p.heads_per_cta + y;
  const bool has_dims = x * 8 < d;
  // Padding threads (z >= bdz, or heads past the group in the last chunk)
  // compute on a real row so every warp stays whole, but write nothing.
  const int zz = min(z, p.bdz - 1);
  const int64_t head = kv_head * group + min(head_in_group, group - 1);

  // Clamped so unchecked indices (PYVLM_CHECK_INDICES=0) never read past
  // the block table.
  const int64_t seq_len =
      min(max(int64_t(a.seq_lens[seq]), int64_t(0)), a.max_pages_per_seq * a.page_size);
  const int64_t tiles_per_split = ceil_div(ceil_div(seq_len, p.tile), p.num_splits);
  const int64_t start = split * tiles_per_split * p.tile;
  const int64_t end = min(seq_len, start + tiles_per_split * p.tile);

  float q[8];
  const float q_scale = a.scale * 1.4426950408889634f;  // scores in log2 units
  const T* q_row = a.query + seq * a.query_stride_seq + head * a.query_stride_head + x * 8;
#pragma unroll
  for (int e = 0; e < 8; ++e) q[e] = has_dims ? to_float(q_row[e]) * q_scale : 0.f;

  SoftmaxState st;
  T* k_smem = reinterpret_cast<T*>(smem_raw);
  T* v_smem = k_smem + kDecodeStages * p.tile * d;
  const int32_t* block_table = a.block_tables + seq * a.block_table_stride;
  const int tpz = p.tile / p.bdz;
  if (start < end) {  // uniform over the block
    const int num_tiles = static_cast<int>(ceil_div(end - start, p.tile));
#pragma unroll
    for (int s = 0; s < kDecodeStages - 1; ++s) {
      if (s < num_tiles)
        load_tile(a, p, block_table, kv_head, start + int64_t(s) * p.tile, end,
                  k_smem + s * p.tile * d, v_smem + s * p.tile * d);
      cp_async_commit();
    }
    for (int j = 0; j < num_tiles; ++j) {
      const int next = j + kDecodeStages - 1;
      if (next < num_tiles) {
        const int stage = next % kDecodeStages;
        load_tile(a, p, block_table, kv_head, start + int64_t(next) * p.tile, end,
                  k_smem + stage * p.tile * d, v_smem + stage * p.tile * d);
      }
      cp_async_commit();
      cp_async_wait<kDecodeStages - 1>();  // tile j has landed (this thread's copies)
      __syncthreads();                     // ... and everyone else's
      const int stage = j % kDecodeStages;
      const int num_valid = static_cast<int>(min(int64_t(p.tile), end - (start + int64_t(j) * p.tile)));
      attend_tile<BDX>(k_smem + stage * p.tile * d, v_smem + stage * p.tile * d, zz * tpz, tpz,
                       num_valid, d, x, has_dims, q, st);
      __syncthreads();  // the stage is refilled next iteration
    }
  }
  cp_async_wait<0>();
  __syncthreads();
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

template <typename T, int BDX>
void launch_paged_decode_bdx(const PagedDecodeArgs<T>& a, const DecodePlan& p, float* part_out,
                             float* part_lse, cudaStream_t stream) {
  auto kernel = paged_decode_kernel<T, BDX>;
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

// part_out / part_lse: float workspaces of num_seqs * num_heads *
// p.num_splits * head_dim and num_seqs * num_heads * p.num_splits elements,
// needed only when p.num_splits > 1. Pointers of out and the caches must be
// 16-byte aligned.
template <typename T>
void launch_paged_attention_decode(const PagedDecodeArgs<T>& a, const DecodePlan& p,
                                   float* part_out, float* part_lse, cudaStream_t stream) {
  if (a.num_seqs == 0 || a.num_heads == 0) return;
  switch (p.bdx) {
    case 1: return launch_paged_decode_bdx<T, 1>(a, p, part_out, part_lse, stream);
    case 2: return launch_paged_decode_bdx<T, 2>(a, p, part_out, part_lse, stream);
    case 4: return launch_paged_decode_bdx<T, 4>(a, p, part_out, part_lse, stream);
    case 8: return launch_paged_decode_bdx<T, 8>(a, p, part_out, part_lse, stream);
    case 16: return launch_paged_decode_bdx<T, 16>(a, p, part_out, part_lse, stream);
    default: return launch_paged_decode_bdx<T, 32>(a, p, part_out, part_lse, stream);
  }
}

}  // namespace attention_impl

using attention_impl::DecodePlan;
using attention_impl::launch_paged_attention_decode;
using attention_impl::launch_reshape_and_cache;
using attention_impl::plan_paged_decode;

}  // namespace cuda
}  // namespace pyvlm
