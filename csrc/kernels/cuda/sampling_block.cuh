// Block-wide building blocks of the CUDA sampler (sampling.cuh): row loads,
// softmax statistics, Gumbel-max draws, reductions, a prefix scan of tallies
// and a bitonic sort in shared memory. One block of kThreads per row.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../sampling.h"
#include "common.cuh"
#include "sampling_bins.cuh"

namespace pyvlm {
namespace cuda {
namespace sampling {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Independent 16-byte loads in flight per thread: 32 KB per block, enough
// with two blocks per SM to keep HBM busy.
constexpr int kUnroll = 4;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct VecWidth {
  static constexpr int value = 16 / sizeof(T);
};

// One row of logits; aligned: 16-byte loads are possible.
template <typename T>
struct RowView {
  const T* __restrict__ data;
  int vocab;
  bool aligned;
};

// Elements [chunk * N, chunk * N + N) of the row, still in the storage type,
// one by one (a partial or unaligned chunk); indices past the row read as -inf.
template <int N, typename T>
__device__ __forceinline__ uint4 load_chunk_scalar(const RowView<T>& row, int chunk) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
  const int base = chunk * N;
#pragma unroll
  for (int i = 0; i < N; ++i)
    e[i] = base + i < row.vocab ? row.data[base + i] : from_float<T>(-INFINITY);
  return raw;
}

// The chunks [0, num_vector_chunks) are whole and 16-byte aligned.
template <int N, typename T>
__device__ __forceinline__ int num_vector_chunks(const RowView<T>& row) {
  return row.aligned ? row.vocab / N : 0;
}

template <int N, typename T>
__device__ __forceinline__ uint4 load_chunk(const RowView<T>& row, int chunk) {
  return chunk < num_vector_chunks<N>(row) ? __ldg(reinterpret_cast<const uint4*>(row.data) + chunk)
                                           : load_chunk_scalar<N>(row, chunk);
}

template <int N, typename T>
__device__ __forceinline__ void chunk_values(const uint4& raw, float (&v)[N]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = to_float(e[i]);
}

// Calls f(chunk, values) for every chunk of the row this thread owns, in
// increasing index order: whole aligned chunks with kUnroll 16-byte loads in
// flight (raw until used, which keeps 16-bit rows at 16 registers of loads),
// then the rest (a partial last chunk, or every chunk of an unaligned row)
// element by element.
template <int N, typename T, typename F>
__device__ __forceinline__ void for_each_chunk(const RowView<T>& row, F&& f) {
  const int num_vectors = num_vector_chunks<N>(row);
  const uint4* vectors = reinterpret_cast<const uint4*>(row.data);
  for (int c0 = threadIdx.x; c0 < num_vectors; c0 += kThreads * kUnroll) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kThreads;
      if (c < num_vectors) raw[u] = __ldg(vectors + c);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kThreads;
      if (c >= num_vectors) continue;
      float v[N];
      chunk_values<N, T>(raw[u], v);
      f(c, v);
    }
  }
  const int num_chunks = (row.vocab + N - 1) / N;
  for (int c = num_vectors + threadIdx.x; c < num_chunks; c += kThreads) {
    float v[N];
    chunk_values<N, T>(load_chunk_scalar<N>(row, c), v);
    f(c, v);
  }
}

constexpr int kGroup = 4;  // elements per Philox block

// Elements [4q, 4q + 4) of a chunk; q is 0 or (16-bit types) 1, picked by
// selects so that the chunk stays in registers.
template <int N, typename T>
__device__ __forceinline__ void group_values(const uint4& raw, int q, float (&v)[kGroup]) {
  constexpr int kSecond = N > kGroup ? kGroup : 0;  // where group 1 starts
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < kGroup; ++j) v[j] = q == 0 ? to_float(e[j]) : to_float(e[kSecond + j]);
}

// For passes where few elements need work: mark(c, values) returns a bit per
// element of chunk c that does, and handle(first, values, bits) does it for
// the group of 4 elements from `first`, once per marked group. The unrolled
// loop only marks; the work runs from one code site (re-loading the chunk,
// still in L1), which keeps the hot loop small and its loads dead meanwhile.
template <int N, typename T, typename Mark, typename Handle>
__device__ __forceinline__ void for_each_marked_group(const RowView<T>& row, Mark&& mark,
                                                      Handle&& handle) {
  static_assert(kUnroll * N <= 32 && N % kGroup == 0, "one bit per element of an iteration");
  constexpr uint32_t kGroupBits = (1u << kGroup) - 1;
  const int num_vectors = num_vector_chunks<N>(row);
  const uint4* vectors = reinterpret_cast<const uint4*>(row.data);
  for (int c0 = threadIdx.x; c0 < num_vectors; c0 += kThreads * kUnroll) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kThreads;
      if (c < num_vectors) raw[u] = __ldg(vectors + c);
    }
    uint32_t marks = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kThreads;
      if (c >= num_vectors) continue;
      float v[N];
      chunk_values<N, T>(raw[u], v);
      marks |= mark(c, v) << (u * N);
    }
    while (marks != 0) {
      const int group = (__ffs(marks) - 1) / kGroup;
      const uint32_t bits = (marks >> (group * kGroup)) & kGroupBits;
      marks &= ~(kGroupBits << (group * kGroup));
      const int u = group / (N / kGroup), q = group % (N / kGroup);
      const int c = c0 + u * kThreads;
      float v[kGroup];
      group_values<N, T>(__ldg(vectors + c), q, v);
      handle(c * N + q * kGroup, v, bits);
    }
  }
  const int num_chunks = (row.vocab + N - 1) / N;
  for (int c = num_vectors + threadIdx.x; c < num_chunks; c += kThreads) {
    const uint4 raw = load_chunk_scalar<N>(row, c);
    float v[N];
    chunk_values<N, T>(raw, v);
    const uint32_t marks = mark(c, v);
#pragma unroll
    for (int q = 0; q < N / kGroup; ++q) {
      const uint32_t bits = (marks >> (q * kGroup)) & kGroupBits;
      if (bits == 0) continue;
      float w[kGroup];
      group_values<N, T>(raw, q, w);
      handle(c * N + q * kGroup, w, bits);
    }
  }
}

// Row maximum, softmax normalisers at temperature 1 (for the log-probs) and
// at T (for top-p only), first argmax.
struct Stats {
  float max, sum1, sumT;
  int argmax;  // INT32_MAX: none yet
};

constexpr Stats kNoStats{-INFINITY, 0.f, 0.f, INT32_MAX};

// Online softmax with one rescale per chunk, not per element: the chunk's
// first maximum is found with compares, then each element costs one exp
// (two with sumT).
template <int N>
__device__ __forceinline__ void stats_add_chunk(Stats& s, const float (&v)[N], int base,
                                                float inv_temp, bool with_sum_t) {
  float chunk_max = -INFINITY;
  int first = 0;
#pragma unroll
  for (int e = 0; e < N; ++e)
    if (v[e] > chunk_max) chunk_max = v[e], first = e;
  if (chunk_max > s.max) {
    s.sum1 *= __expf(s.max - chunk_max);
    if (with_sum_t) s.sumT *= __expf((s.max - chunk_max) * inv_temp);
    s.max = chunk_max;
    s.argmax = base + first;
  }
  if (!(s.max > -INFINITY)) return;  // nothing finite yet: exp(-inf - -inf) is NaN
#pragma unroll
  for (int e = 0; e < N; ++e) {
    s.sum1 += __expf(v[e] - s.max);
    if (with_sum_t) s.sumT += __expf((v[e] - s.max) * inv_temp);
  }
}

__device__ __forceinline__ Stats stats_merge(const Stats& a, const Stats& b, float inv_temp,
                                             bool with_sum_t) {
  Stats r;
  r.max = fmaxf(a.max, b.max);
  r.argmax = a.max > b.max ? a.argmax : b.max > a.max ? b.argmax : min(a.argmax, b.argmax);
  if (r.max == -INFINITY) return Stats{-INFINITY, 0.f, 0.f, r.argmax};
  r.sum1 = a.sum1 * __expf(a.max - r.max) + b.sum1 * __expf(b.max - r.max);
  r.sumT = with_sum_t ? a.sumT * __expf((a.max - r.max) * inv_temp) +
                            b.sumT * __expf((b.max - r.max) * inv_temp)
                      : 0.f;
  return r;
}

__device__ __forceinline__ Stats stats_shfl(const Stats& s, int offset) {
  return Stats{__shfl_xor_sync(kFullMask, s.max, offset),
               __shfl_xor_sync(kFullMask, s.sum1, offset),
               __shfl_xor_sync(kFullMask, s.sumT, offset),
               __shfl_xor_sync(kFullMask, s.argmax, offset)};
}

// Block-wide merge; every thread gets the result.
__device__ __forceinline__ Stats block_stats(Stats s, float inv_temp, bool with_sum_t,
                                             Stats* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s = stats_merge(s, stats_shfl(s, o), inv_temp, with_sum_t);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  // Lanes past the warp count take the identity (sums must not double count).
  s = lane < kWarps ? scratch[lane] : kNoStats;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s = stats_merge(s, stats_shfl(s, o), inv_temp, with_sum_t);
  __syncthreads();  // scratch may be reused
  return s;
}

// Reduction with op over the block; every thread gets the result.
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V identity, V* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : identity;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  __syncthreads();
  return v;
}

struct MinOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a < b ? a : b; }
};
struct MaxOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a > b ? a : b; }
};

// In place, items[i] becomes the sum of all items before it in block order
// (thread 0's first item first); returns the block total.
template <int kItems>
__device__ __forceinline__ Tally block_exclusive_scan(Tally (&items)[kItems], Tally* scratch) {
  Tally sum{0, 0};
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const Tally t = items[i];
    items[i] = sum;
    sum = sum + t;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Tally inclusive = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const Tally up{__shfl_up_sync(kFullMask, inclusive.count, o),
                   __shfl_up_sync(kFullMask, inclusive.mass, o)};
    if (lane >= o) inclusive = inclusive + up;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  Tally offset = inclusive - sum, total{0, 0};
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) offset = offset + scratch[w];
    total = total + scratch[w];
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) items[i] = items[i] + offset;
  __syncthreads();  // scratch may be reused
  return total;
}

// Sorts keys[0, n) descending in place: a bitonic network over the next
// power of two, padded with 0 (which sorts last), so keys must have room for it.
__device__ __forceinline__ void sort_descending(uint64_t* keys, int n) {
  int size = 1;
  while (size < n) size <<= 1;
  for (int i = n + threadIdx.x; i < size; i += kThreads) keys[i] = 0;
  __syncthreads();
  for (int k = 2; k <= size; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < size / 2; i += kThreads) {
        const int lo = ((i & ~(j - 1)) << 1) | (i & (j - 1)), hi = lo + j;
        const uint64_t a = keys[lo], b = keys[hi];
        // Runs with (lo & k) == 0 go descending; the last merge (k == size) is one.
        if ((a < b) == ((lo & k) == 0)) keys[lo] = b, keys[hi] = a;
      }
      __syncthreads();
    }
  }
}

struct Best {
  float score;
  int index;  // INT32_MAX: none
};

constexpr Best kNoBest{-INFINITY, INT32_MAX};

__device__ __forceinline__ bool better(const Best& a, const Best& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

__device__ __forceinline__ Best best_of(const Best& a, const Best& b) {
  return better(b, a) ? b : a;
}

__device__ __forceinline__ Best best_shfl(const Best& b, int offset) {
  return Best{__shfl_xor_sync(kFullMask, b.score, offset),
              __shfl_xor_sync(kFullMask, b.index, offset)};
}

__device__ __forceinline__ Best block_best(Best b, Best* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) b = best_of(b, best_shfl(b, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = b;
  __syncthreads();
  b = lane < kWarps ? scratch[lane] : kNoBest;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) b = best_of(b, best_shfl(b, o));
  __syncthreads();
  return b;
}

// What a Gumbel-max draw needs of its row.
struct GumbelRow {
  float max, inv_temp;
  int64_t seed, step;
};

__device__ __forceinline__ float gumbel_score(const GumbelRow& g, float l, uint32_t bits) {
  return (l - g.max) * g.inv_temp + gumbel_from_uniform(philox::uniform_open(bits));
}

// One token's draw; its Philox block is its own (candidates are scattered).
__device__ __forceinline__ void gumbel_token(Best& best, const GumbelRow& g, float l, int i) {
  const philox::Uint4 r = philox::random_block(g.seed, g.step, uint32_t(i) >> 2);
  const Best cand{gumbel_score(g, l, philox::lane(r, i & 3)), i};
  if (better(cand, best)) best = cand;
}

// Draws for the kept elements (bits) of the group of 4 from `first`, a
// multiple of 4: one Philox block.
__device__ __forceinline__ void gumbel_group(Best& best, const GumbelRow& g,
                                             const float (&v)[kGroup], uint32_t kept, int first) {
  if (kept == 0) return;
  const philox::Uint4 r = philox::random_block(g.seed, g.step, uint32_t(first) / kGroup);
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    if (!(kept >> j & 1)) continue;
    const Best cand{gumbel_score(g, v[j], philox::lane(r, j)), first + j};
    if (better(cand, best)) best = cand;
  }
}

}  // namespace sampling
}  // namespace cuda
}  // namespace pyvlm
