// CUDA layer kernels: RMS norms (one block per row, 16-byte vectors, HF
// rounding order), rotary embeddings (one block per token, plain and
// Qwen2-VL mrope) and the multimodal embedding merge (one block per row).
// Framework-free: plain pointers, sizes and a stream.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../layers.h"
#include "common.cuh"

namespace pyvlm {
namespace cuda {

// Helper names carry a layer_/norm_/rotary_ prefix: the .cu adapters may be
// compiled as one unity translation unit with other groups' kernels.

// Enough blocks to fill any GPU; kernels stride over the rest.
constexpr int64_t kLayerMaxBlocks = 65535LL * 32;

inline unsigned layer_blocks(int64_t items) {
  return static_cast<unsigned>(std::min(items, kLayerMaxBlocks));
}

inline unsigned layer_threads(int64_t work, int64_t max_threads) {
  const int64_t warps = (std::min(work, max_threads) + 31) / 32;
  return static_cast<unsigned>(std::max<int64_t>(1, warps) * 32);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) LayerPack {
  T v[N];
};

// y = round(x * inv), out = round(w * y): HF rounds before the weight.
template <typename T, int N>
__device__ __forceinline__ LayerPack<T, N> norm_scale_pack(const LayerPack<T, N>& x,
                                                           const LayerPack<T, N>& w,
                                                 float inv) {
  LayerPack<T, N> o;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const T y = from_float<T>(to_float(x.v[k]) * inv);
    o.v[k] = from_float<T>(to_float(w.v[k]) * to_float(y));
  }
  return o;
}

template <typename T, int N>
__device__ __forceinline__ float norm_sum_squares(const LayerPack<T, N>& x) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < N; ++k) s += to_float(x.v[k]) * to_float(x.v[k]);
  return s;
}

// N elements per 16-byte pack (1 when rows are not 16-byte aligned). `out`
// may alias `in`: each thread reads its packs before writing them. The mean
// is sum * (1 / hidden) and rsqrtf the reciprocal root, as torch's CUDA
// mean and rsqrt, so that HF's module on the GPU rounds the same way.
template <typename T, int N>
__global__ void rms_norm_kernel(T* out, const T* in, const T* __restrict__ weight,
                                int64_t num_rows, int64_t hidden, float inv_hidden,
                                float eps) {
  __shared__ float scratch[32];
  start_after_prerequisite_grid();
  using P = LayerPack<T, N>;
  const int64_t num_packs = hidden / N;
  const P* w = reinterpret_cast<const P*>(weight);
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const P* x = reinterpret_cast<const P*>(in + row * hidden);
    float ss = 0.f;
    for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x) ss += norm_sum_squares(x[i]);
    const float inv = rsqrtf(block_sum(ss, scratch) * inv_hidden + eps);
    P* y = reinterpret_cast<P*>(out + row * hidden);
    for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x)
      y[i] = norm_scale_pack(x[i], w[i], inv);
  }
}

// residual = round(input + residual); input = rms_norm(residual). The second
// pass reads back the packs this same thread wrote in the first.
template <typename T, int N>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ input, T* __restrict__ residual,
                                          const T* __restrict__ weight, int64_t num_rows,
                                          int64_t hidden, float inv_hidden, float eps) {
  __shared__ float scratch[32];
  start_after_prerequisite_grid();
  using P = LayerPack<T, N>;
  const int64_t num_packs = hidden / N;
  const P* w = reinterpret_cast<const P*>(weight);
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    P* x = reinterpret_cast<P*>(input + row * hidden);
    P* res = reinterpret_cast<P*>(residual + row * hidden);
    float ss = 0.f;
    for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x) {
      const P a = x[i];
      P z = res[i];
#pragma unroll
      for (int k = 0; k < N; ++k) z.v[k] = from_float<T>(to_float(a.v[k]) + to_float(z.v[k]));
      res[i] = z;
      ss += norm_sum_squares(z);
    }
    const float inv = rsqrtf(block_sum(ss, scratch) * inv_hidden + eps);
    for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x)
      x[i] = norm_scale_pack(res[i], w[i], inv);
  }
}

inline bool layer_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// LayerPack width for rows of `hidden` elements starting at the given pointers.
template <typename T>
int layer_pack_width(int64_t hidden, const void* a, const void* b, const void* c) {
  constexpr int kWide = 16 / sizeof(T);
  const bool aligned = layer_aligned16(a) && layer_aligned16(b) && layer_aligned16(c);
  return hidden % kWide == 0 && aligned ? kWide : 1;
}

template <typename T>
void launch_rms_norm(T* out, const T* in, const T* weight, int64_t num_rows, int64_t hidden,
                     float eps, cudaStream_t stream) {
  if (num_rows == 0 || hidden == 0) return;
  constexpr int kWide = 16 / sizeof(T);
  const float inv_hidden = 1.f / static_cast<float>(hidden);
  if (layer_pack_width<T>(hidden, out, in, weight) == kWide) {
    launch_programmatic(rms_norm_kernel<T, kWide>, dim3(layer_blocks(num_rows)),
                        dim3(layer_threads(hidden / kWide, 1024)), 0, stream, out, in, weight,
                        num_rows, hidden, inv_hidden, eps);
  } else {
    launch_programmatic(rms_norm_kernel<T, 1>, dim3(layer_blocks(num_rows)),
                        dim3(layer_threads(hidden, 1024)), 0, stream, out, in, weight, num_rows,
                        hidden, inv_hidden, eps);
  }
}

template <typename T>
void launch_fused_add_rms_norm(T* input, T* residual, const T* weight, int64_t num_rows,
                               int64_t hidden, float eps, cudaStream_t stream) {
  if (num_rows == 0 || hidden == 0) return;
  constexpr int kWide = 16 / sizeof(T);
  const float inv_hidden = 1.f / static_cast<float>(hidden);
  if (layer_pack_width<T>(hidden, input, residual, weight) == kWide) {
    launch_programmatic(fused_add_rms_norm_kernel<T, kWide>, dim3(layer_blocks(num_rows)),
                        dim3(layer_threads(hidden / kWide, 1024)), 0, stream, input, residual,
                        weight, num_rows, hidden, inv_hidden, eps);
  } else {
    launch_programmatic(fused_add_rms_norm_kernel<T, 1>, dim3(layer_blocks(num_rows)),
                        dim3(layer_threads(hidden, 1024)), 0, stream, input, residual, weight,
                        num_rows, hidden, inv_hidden, eps);
  }
}

// ---- rotary ------------------------------------------------------------------

__device__ __forceinline__ bool rotary_position_valid(int64_t pos, int64_t max_position) {
  return pos >= 0 && pos < max_position;
}

// Token t's position for frequency j (mrope: the row of j's section).
template <bool kMrope>
__device__ __forceinline__ int64_t rotary_position_of(const int64_t* positions, int64_t t,
                                                      int64_t j,
                                               const MropeSections& s) {
  if constexpr (kMrope) {
    // Ends are cumulative, so j's section is the count of earlier ends <= j;
    // constant indices keep `s` in the parameter space (no local copy).
    int sec = 0;
#pragma unroll
    for (int k = 0; k + 1 < kMaxMropeSections; ++k)
      sec += (k + 1 < s.num_sections && j >= s.end[k]) ? 1 : 0;
    return positions[(sec % 3) * s.positions_row_stride + t];
  } else {
    return positions[t];
  }
}

template <bool kMrope>
__device__ __forceinline__ bool rotary_token_valid(const int64_t* positions, int64_t t,
                                            const MropeSections& s, int64_t max_position) {
  if constexpr (kMrope) {
    bool ok = true;
    for (int row = 0; row < 3; ++row)
      ok = ok && rotary_position_valid(positions[row * s.positions_row_stride + t], max_position);
    return ok;
  } else {
    return rotary_position_valid(positions[t], max_position);
  }
}

template <typename T>
__device__ __forceinline__ void rotary_pair(T* x, int64_t j, int64_t half, bool is_neox,
                                            float c, float s) {
  const int64_t i1 = is_neox ? j : 2 * j;
  const int64_t i2 = is_neox ? j + half : 2 * j + 1;
  const float a = to_float(x[i1]), b = to_float(x[i2]);
  x[i1] = from_float<T>(a * c - b * s);
  x[i2] = from_float<T>(b * c + a * s);
}

// One thread per (token, head, pair): blocks stride over tokens in x and over
// a token's pairs in y, so a short step (a decode token: 40 heads x 64 pairs)
// spreads over several blocks with one pair per thread. Its latency is then
// the position's load followed by the cos/sin row and the pair in parallel:
// no shared-memory staging, no block barrier, no loop of dependent loads
// (a one-block-per-token version took 3.4 us for one Llama token on an H100,
// a step's 32 calls 0.1 ms). The row is read by every head's threads, from L1.
// Tokens with an invalid position are skipped.
template <typename T, typename C, bool kMrope>
__global__ void rotary_kernel(const int64_t* __restrict__ positions, T* __restrict__ query,
                              T* __restrict__ key, const C* __restrict__ cache,
                              RotaryLayout l, MropeSections sections, int64_t num_tokens) {
  const int64_t half = l.rotary_dim / 2;
  const int half_i = static_cast<int>(half);
  const int num_pairs = static_cast<int>((l.num_q_heads + l.num_k_heads) * half);
  const int first = static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x);
  const int stride = static_cast<int>(gridDim.y * blockDim.x);
  start_after_prerequisite_grid();
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    if (!rotary_token_valid<kMrope>(positions, t, sections, l.max_position)) continue;
    for (int p = first; p < num_pairs; p += stride) {
      const int head = p / half_i, j = p % half_i;
      const C* row = cache + rotary_position_of<kMrope>(positions, t, j, sections) * l.rotary_dim;
      T* x = head < l.num_q_heads
                 ? query + t * l.q_token_stride + head * l.q_head_stride
                 : key + t * l.k_token_stride + (head - l.num_q_heads) * l.k_head_stride;
      rotary_pair(x, j, half, l.is_neox, to_float(row[j]), to_float(row[half + j]));
    }
  }
}

// ---- rotary over many tokens (prefill rows, vision-tower patches) ----------
//
// The kernel above gives each thread one pair: for a prefill or a tower call
// (Qwen2-VL's tower: 1,564 patches x 32 heads x 40 pairs per layer) that is
// millions of threads, each a chain of dependent loads (positions, then the
// cos/sin row, then the pair) for 4 bytes of work: 20 us a layer on an H100,
// 4x its bandwidth floor. Here a thread takes N consecutive frequencies of
// one token (vector loads of the head's elements) and rotates them in every
// kRotaryHeadsPerThread-th head, so the token's positions and its cos/sin
// values are loaded once for several heads and the heads' loads are
// independent. Lanes of a token: chunk (fastest), then head; consecutive
// lanes touch consecutive memory.

constexpr int64_t kRotaryThreads = 256;
constexpr int64_t kRotaryMaxPairBlocks = 16;
// Heads one thread rotates (enough independent vector loads to hide latency,
// enough threads to fill the GPU at a few hundred tokens).
constexpr int64_t kRotaryHeadsPerThread = 4;
// Below this many tokens the one-pair-per-thread kernel's latency wins.
constexpr int64_t kRotaryRowsMinTokens = 64;

// The N elements rotated by one thread in one head: neox reads N of the first
// half and the N partners half further; interleaved reads N pairs (2N values).
template <typename T, int N, bool kNeox>
__device__ __forceinline__ void rotary_rotate_chunk(T* x, int64_t j0, int64_t half,
                                                    const float (&c)[N], const float (&s)[N]) {
  if constexpr (kNeox) {
    auto* lo = reinterpret_cast<LayerPack<T, N>*>(x + j0);
    auto* hi = reinterpret_cast<LayerPack<T, N>*>(x + j0 + half);
    const LayerPack<T, N> a = *lo, b = *hi;
    LayerPack<T, N> ra, rb;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float fa = to_float(a.v[k]), fb = to_float(b.v[k]);
      ra.v[k] = from_float<T>(fa * c[k] - fb * s[k]);
      rb.v[k] = from_float<T>(fb * c[k] + fa * s[k]);
    }
    *lo = ra;
    *hi = rb;
  } else {
    auto* p = reinterpret_cast<LayerPack<T, 2 * N>*>(x + 2 * j0);
    const LayerPack<T, 2 * N> v = *p;
    LayerPack<T, 2 * N> r;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float fa = to_float(v.v[2 * k]), fb = to_float(v.v[2 * k + 1]);
      r.v[2 * k] = from_float<T>(fa * c[k] - fb * s[k]);
      r.v[2 * k + 1] = from_float<T>(fb * c[k] + fa * s[k]);
    }
    *p = r;
  }
}

template <typename T, typename C, bool kMrope, int N, bool kNeox>
__global__ void rotary_rows_kernel(const int64_t* __restrict__ positions, T* __restrict__ query,
                                   T* __restrict__ key, const C* __restrict__ cache,
                                   RotaryLayout l, MropeSections sections, int64_t num_tokens,
                                   int64_t heads_in_parallel) {
  const int64_t half = l.rotary_dim / 2;
  const int64_t num_chunks = half / N;
  const int64_t lanes = num_chunks * heads_in_parallel;
  const int64_t num_heads = l.num_q_heads + l.num_k_heads;
  start_after_prerequisite_grid();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < num_tokens * lanes; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / lanes, lane = i % lanes;
    if (!rotary_token_valid<kMrope>(positions, t, sections, l.max_position)) continue;
    const int64_t j0 = (lane % num_chunks) * N;
    float c[N], s[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const C* row =
          cache + rotary_position_of<kMrope>(positions, t, j0 + k, sections) * l.rotary_dim;
      c[k] = to_float(row[j0 + k]);
      s[k] = to_float(row[half + j0 + k]);
    }
    for (int64_t head = lane / num_chunks; head < num_heads; head += heads_in_parallel) {
      T* x = head < l.num_q_heads
                 ? query + t * l.q_token_stride + head * l.q_head_stride
                 : key + t * l.k_token_stride + (head - l.num_q_heads) * l.k_head_stride;
      rotary_rotate_chunk<T, N, kNeox>(x, j0, half, c, s);
    }
  }
}

// Whether every head of query and key starts on a multiple of `elements`
// elements, so vectors of that many elements (a power of two) stay aligned.
template <typename T>
bool rotary_heads_aligned(const T* query, const T* key, const RotaryLayout& l,
                          int64_t elements) {
  const auto aligned = [&](const T* p) {
    return reinterpret_cast<uintptr_t>(p) % (elements * sizeof(T)) == 0;
  };
  return aligned(query) && aligned(key) && l.q_token_stride % elements == 0 &&
         l.q_head_stride % elements == 0 && l.k_token_stride % elements == 0 &&
         l.k_head_stride % elements == 0;
}

template <typename T, typename C, bool kMrope, int N, bool kNeox>
void launch_rotary_rows_n(const int64_t* positions, T* query, T* key, const C* cache,
                          const RotaryLayout& layout, const MropeSections& sections,
                          int64_t num_tokens, cudaStream_t stream) {
  const int64_t num_heads = layout.num_q_heads + layout.num_k_heads;
  const int64_t heads_in_parallel =
      (num_heads + kRotaryHeadsPerThread - 1) / kRotaryHeadsPerThread;
  const int64_t threads = num_tokens * (layout.rotary_dim / 2 / N) * heads_in_parallel;
  const int64_t blocks = std::min<int64_t>((threads + kRotaryThreads - 1) / kRotaryThreads,
                                           kLayerMaxBlocks);
  launch_programmatic(rotary_rows_kernel<T, C, kMrope, N, kNeox>,
                      dim3(static_cast<unsigned>(blocks)), dim3(kRotaryThreads), 0, stream,
                      positions, query, key, cache, layout, sections, num_tokens,
                      heads_in_parallel);
}

// The widest vector (at most 16 bytes) that the half and the heads' alignment
// allow; false when not even pairs of values line up (the caller then runs
// the one-pair-per-thread kernel).
template <typename T, typename C, bool kMrope, bool kNeox>
bool launch_rotary_rows(const int64_t* positions, T* query, T* key, const C* cache,
                        const RotaryLayout& layout, const MropeSections& sections,
                        int64_t num_tokens, cudaStream_t stream) {
  constexpr int kMaxValues = static_cast<int>(16 / sizeof(T));
  constexpr int kMaxN = kNeox ? kMaxValues : kMaxValues / 2;
  const int64_t half = layout.rotary_dim / 2;
  const auto fits = [&](int n) {
    return n <= kMaxN && half % n == 0 &&
           rotary_heads_aligned(query, key, layout, kNeox ? n : 2 * n);
  };
  if (fits(8)) {
    if constexpr (kMaxN >= 8)
      launch_rotary_rows_n<T, C, kMrope, 8, kNeox>(positions, query, key, cache, layout,
                                                   sections, num_tokens, stream);
  } else if (fits(4)) {
    if constexpr (kMaxN >= 4)
      launch_rotary_rows_n<T, C, kMrope, 4, kNeox>(positions, query, key, cache, layout,
                                                   sections, num_tokens, stream);
  } else if (fits(2)) {
    launch_rotary_rows_n<T, C, kMrope, 2, kNeox>(positions, query, key, cache, layout,
                                                 sections, num_tokens, stream);
  } else {
    return false;
  }
  return true;
}

template <typename T, typename C, bool kMrope>
void launch_rotary_impl(const int64_t* positions, T* query, T* key, const C* cache,
                        const RotaryLayout& layout, const MropeSections& sections,
                        int64_t num_tokens, cudaStream_t stream) {
  const int64_t num_pairs = (layout.num_q_heads + layout.num_k_heads) * (layout.rotary_dim / 2);
  if (num_tokens == 0 || num_pairs == 0) return;
  if (num_tokens >= kRotaryRowsMinTokens) {
    const bool launched =
        layout.is_neox
            ? launch_rotary_rows<T, C, kMrope, true>(positions, query, key, cache, layout,
                                                     sections, num_tokens, stream)
            : launch_rotary_rows<T, C, kMrope, false>(positions, query, key, cache, layout,
                                                      sections, num_tokens, stream);
    if (launched) return;
  }
  const unsigned threads = layer_threads(num_pairs, kRotaryThreads);
  const int64_t pair_blocks = std::min<int64_t>((num_pairs + threads - 1) / threads,
                                                kRotaryMaxPairBlocks);
  const dim3 grid(layer_blocks(num_tokens), static_cast<unsigned>(pair_blocks));
  launch_programmatic(rotary_kernel<T, C, kMrope>, grid, dim3(threads), 0, stream, positions,
                      query, key, cache, layout, sections, num_tokens);
}

template <typename T, typename C>
void launch_rotary_embedding(const int64_t* positions, T* query, T* key, const C* cache,
                             const RotaryLayout& layout, int64_t num_tokens,
                             cudaStream_t stream) {
  launch_rotary_impl<T, C, false>(positions, query, key, cache, layout, MropeSections{},
                                  num_tokens, stream);
}

template <typename T, typename C>
void launch_mrope(const int64_t* positions, T* query, T* key, const C* cache,
                  const RotaryLayout& layout, const MropeSections& sections, int64_t num_tokens,
                  cudaStream_t stream) {
  launch_rotary_impl<T, C, true>(positions, query, key, cache, layout, sections, num_tokens,
                                 stream);
}

// ---- merge -------------------------------------------------------------------

// Copies mm row i to row positions[i] in words of type W; invalid positions
// are skipped.
template <typename W>
__global__ void merge_rows_kernel(char* __restrict__ dst, int64_t dst_row_stride,
                                  int64_t num_dst_rows, const char* __restrict__ src,
                                  int64_t src_row_stride, int64_t row_bytes,
                                  const int64_t* __restrict__ positions, int64_t num_rows) {
  const int64_t num_words = row_bytes / static_cast<int64_t>(sizeof(W));
  for (int64_t i = blockIdx.x; i < num_rows; i += gridDim.x) {
    const int64_t p = positions[i];
    if (p < 0 || p >= num_dst_rows) continue;
    W* d = reinterpret_cast<W*>(dst + p * dst_row_stride);
    const W* s = reinterpret_cast<const W*>(src + i * src_row_stride);
    for (int64_t k = threadIdx.x; k < num_words; k += blockDim.x) d[k] = s[k];
  }
}

template <typename W>
void launch_merge_words(char* dst, int64_t dst_row_stride, int64_t num_dst_rows, const char* src,
                        int64_t src_row_stride, int64_t row_bytes, const int64_t* positions,
                        int64_t num_rows, cudaStream_t stream) {
  merge_rows_kernel<W><<<layer_blocks(num_rows), layer_threads(row_bytes / sizeof(W), 512), 0,
                         stream>>>(dst, dst_row_stride, num_dst_rows, src, src_row_stride,
                                   row_bytes, positions, num_rows);
}

// Row strides and the row length are in bytes; copies in the widest words
// (16, 8, 4, 2 or 1 bytes) that every address and length is a multiple of.
inline void launch_merge_rows(char* dst, int64_t dst_row_stride, int64_t num_dst_rows,
                              const char* src, int64_t src_row_stride, int64_t row_bytes,
                              const int64_t* positions, int64_t num_rows, cudaStream_t stream) {
  if (num_rows == 0 || row_bytes == 0) return;
  const uint64_t bits = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                        static_cast<uint64_t>(dst_row_stride) |
                        static_cast<uint64_t>(src_row_stride) | static_cast<uint64_t>(row_bytes);
  const auto go = [&](auto word) {
    launch_merge_words<decltype(word)>(dst, dst_row_stride, num_dst_rows, src, src_row_stride,
                                       row_bytes, positions, num_rows, stream);
  };
  if (bits % 16 == 0) return go(uint4{});
  if (bits % 8 == 0) return go(uint2{});
  if (bits % 4 == 0) return go(uint32_t{});
  if (bits % 2 == 0) return go(uint16_t{});
  go(uint8_t{});
}

}  // namespace cuda
}  // namespace pyvlm
