// CUDA token sampling and logit penalties. Framework-free: plain pointers,
// sizes and a stream. Semantics are in ../sampling.h.
//
// sample: one block per row, no host sync, no sort. Passes over the row:
//   1. max, softmax normalisers (T = 1 and T) and first argmax (greedy),
//   2-5. only if top-k/top-p or top logprobs are asked: an 8-bit radix select
//      per pass, count (and mass) histograms privatised per lane in shared
//      memory (bin * 32 + lane: no same-address atomics inside a warp, no
//      bank conflicts), for the sampling threshold and the num_top-th logit,
//   6. Gumbel-max over the kept tokens (Philox only for groups of 4 holding
//      a kept token) and the top-logprob gather.
// Each pass issues two independent 16-byte loads per thread per iteration.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../sampling.h"
#include "common.cuh"

namespace pyvlm {
namespace cuda {
namespace sampling {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 2;
constexpr int kCopies = 32;  // one histogram copy per lane
constexpr size_t kHistBytes = size_t(3) * kRadixBins * kCopies * sizeof(int32_t);

template <typename T>
struct VecWidth {
  static constexpr int value = 16 / sizeof(T);
};

// Loads elements [chunk * N, chunk * N + N) of the row as floats; indices past
// the row read as -inf (callers also skip them by index).
template <int N, typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t vocab,
                                           int64_t chunk, bool aligned, float (&v)[N]) {
  const int64_t base = chunk * N;
  if (aligned && base + N <= vocab) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row) + chunk);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = base + i < vocab ? to_float(row[base + i]) : -INFINITY;
  }
}

// Calls f(chunk, values) for every chunk of the row this thread owns, in
// increasing index order, with kUnroll loads in flight.
template <int N, typename T, typename F>
__device__ __forceinline__ void for_each_chunk(const T* __restrict__ row, int64_t vocab,
                                               bool aligned, F&& f) {
  const int64_t num_chunks = (vocab + N - 1) / N;
  for (int64_t c0 = threadIdx.x; c0 < num_chunks; c0 += int64_t(kThreads) * kUnroll) {
    float v[kUnroll][N];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + int64_t(u) * kThreads;
      if (c < num_chunks) load_chunk<N>(row, vocab, c, aligned, v[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + int64_t(u) * kThreads;
      if (c < num_chunks) f(c, v[u]);
    }
  }
}

struct Stats {
  float max, sum1, sumT;
  int64_t argmax;  // INT64_MAX: none yet
};

__device__ __forceinline__ void stats_add(Stats& s, float l, int64_t i, float inv_temp,
                                          bool greedy) {
  if (l > s.max) {
    s.sum1 = s.sum1 * __expf(s.max - l) + 1.f;
    if (!greedy) s.sumT = s.sumT * __expf((s.max - l) * inv_temp) + 1.f;
    s.max = l;
    s.argmax = i;
  } else if (l > -INFINITY) {
    s.sum1 += __expf(l - s.max);
    if (!greedy) s.sumT += __expf((l - s.max) * inv_temp);
  }
}

__device__ __forceinline__ Stats stats_merge(const Stats& a, const Stats& b, float inv_temp,
                                             bool greedy) {
  Stats r;
  r.max = fmaxf(a.max, b.max);
  if (r.max == -INFINITY) return Stats{-INFINITY, 0.f, 0.f, a.argmax < b.argmax ? a.argmax : b.argmax};
  r.sum1 = a.sum1 * __expf(a.max - r.max) + b.sum1 * __expf(b.max - r.max);
  r.sumT = greedy ? 0.f
                  : a.sumT * __expf((a.max - r.max) * inv_temp) +
                        b.sumT * __expf((b.max - r.max) * inv_temp);
  r.argmax = a.max > b.max ? a.argmax : b.max > a.max ? b.argmax
                                     : (a.argmax < b.argmax ? a.argmax : b.argmax);
  return r;
}

__device__ __forceinline__ Stats stats_shfl(const Stats& s, int offset) {
  return Stats{__shfl_xor_sync(0xffffffffu, s.max, offset),
               __shfl_xor_sync(0xffffffffu, s.sum1, offset),
               __shfl_xor_sync(0xffffffffu, s.sumT, offset),
               __shfl_xor_sync(0xffffffffu, s.argmax, offset)};
}

// Block-wide merge; every thread gets the result.
__device__ __forceinline__ Stats block_stats(Stats s, float inv_temp, bool greedy,
                                             Stats* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s = stats_merge(s, stats_shfl(s, o), inv_temp, greedy);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  // Lanes past the warp count take the identity (sums must not double count).
  s = lane < kWarps ? scratch[lane] : Stats{-INFINITY, 0.f, 0.f, INT64_MAX};
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s = stats_merge(s, stats_shfl(s, o), inv_temp, greedy);
  __syncthreads();  // scratch may be reused
  return s;
}

// Pass 1.
template <int N, typename T>
__device__ Stats row_stats(const T* row, int64_t vocab, bool aligned, const RowFilter& f,
                           Stats* scratch) {
  Stats s{-INFINITY, 0.f, 0.f, INT64_MAX};
  for_each_chunk<N>(row, vocab, aligned, [&](int64_t c, const float (&v)[N]) {
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (c * N + e < vocab) stats_add(s, v[e], c * N + e, f.inv_temp, f.greedy);
  });
  return block_stats(s, f.inv_temp, f.greedy, scratch);
}

struct SelectShared {
  int32_t bin_count[kRadixBins];
  float bin_mass[kRadixBins];
  int32_t top_bin_count[kRadixBins];
  RadixState sample, top;
};

// Passes 2-5: radix selects for the sampling threshold (if f.select) and the
// num_top-th largest logit (if num_top > 0), sharing the loads.
template <int N, typename T>
__device__ void radix_selects(const T* row, int64_t vocab, bool aligned, const RowFilter& f,
                              const Stats& st, int num_top, int32_t* hist, SelectShared& sh) {
  int32_t* h_count = hist;
  float* h_mass = reinterpret_cast<float*>(hist + kRadixBins * kCopies);
  int32_t* h_top = hist + 2 * kRadixBins * kCopies;
  const bool do_sample = f.select, do_top = num_top > 0, use_mass = f.top_p < 1.f;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) sh.sample = sh.top = RadixState{0u, 0, 0.f, 0};
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 3 * kRadixBins * kCopies; i += kThreads) hist[i] = 0;
    __syncthreads();
    const uint32_t mask = radix_mask(shift);
    const uint32_t sample_prefix = sh.sample.prefix, top_prefix = sh.top.prefix;
    for_each_chunk<N>(row, vocab, aligned, [&](int64_t c, const float (&v)[N]) {
#pragma unroll
      for (int e = 0; e < N; ++e) {
        if (c * N + e >= vocab) continue;
        const uint32_t key = float_key(v[e]);
        const int slot = int((key >> shift) & 0xFFu) * kCopies + lane;
        if (do_sample && (key & mask) == sample_prefix) {
          atomicAdd(&h_count[slot], 1);
          if (use_mass) atomicAdd(&h_mass[slot], __expf((v[e] - st.max) * f.inv_temp));
        }
        if (do_top && (key & mask) == top_prefix) atomicAdd(&h_top[slot], 1);
      }
    });
    __syncthreads();
    for (int b = warp; b < kRadixBins; b += kWarps) {
      const int32_t c = __reduce_add_sync(0xffffffffu, h_count[b * kCopies + lane]);
      const float m = warp_sum(h_mass[b * kCopies + lane]);
      const int32_t t = __reduce_add_sync(0xffffffffu, h_top[b * kCopies + lane]);
      if (lane == 0) sh.bin_count[b] = c, sh.bin_mass[b] = m, sh.top_bin_count[b] = t;
    }
    __syncthreads();
    if (do_sample && threadIdx.x == 0)
      radix_step(sh.sample, sh.bin_count, use_mass ? sh.bin_mass : nullptr, shift,
                 f.top_k > 0 ? f.top_k : INT32_MAX, use_mass ? f.top_p * st.sumT : INFINITY);
    if (do_top && threadIdx.x == 32)
      radix_step(sh.top, sh.top_bin_count, nullptr, shift, num_top, INFINITY);
    __syncthreads();
  }
}

struct Best {
  float score;
  int64_t index;  // INT64_MAX: none
};

__device__ __forceinline__ bool better(const Best& a, const Best& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

__device__ __forceinline__ Best block_best(Best b, Best* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const Best other{__shfl_xor_sync(0xffffffffu, b.score, o),
                     __shfl_xor_sync(0xffffffffu, b.index, o)};
    if (better(other, b)) b = other;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = b;
  __syncthreads();
  b = scratch[lane < kWarps ? lane : 0];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const Best other{__shfl_xor_sync(0xffffffffu, b.score, o),
                     __shfl_xor_sync(0xffffffffu, b.index, o)};
    if (better(other, b)) b = other;
  }
  return b;
}

struct TopList {
  int count;
  int64_t index[kSampleMaxTop];
  float value[kSampleMaxTop];
};

__device__ __forceinline__ void top_push(TopList& list, int64_t i, float l) {
  const int pos = atomicAdd(&list.count, 1);
  if (pos < kSampleMaxTop) list.index[pos] = i, list.value[pos] = l;
}

// Pass 6: Gumbel-max over the kept tokens of a sampled row, and the top-N
// gather (tokens above the N-th key, plus its ties when they all fit).
template <int N, typename T>
__device__ Best sample_pass(const T* row, int64_t vocab, bool aligned, const RowFilter& f,
                            const Stats& st, uint32_t threshold, bool do_top, uint32_t top_key,
                            bool all_ties_fit, int64_t seed, int64_t step, TopList& list) {
  Best best{-INFINITY, INT64_MAX};
  for_each_chunk<N>(row, vocab, aligned, [&](int64_t c, const float (&v)[N]) {
    bool kept[N];
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const int64_t i = c * N + e;
      const uint32_t key = float_key(v[e]);
      if (do_top && i < vocab && (key > top_key || (key == top_key && all_ties_fit)))
        top_push(list, i, v[e]);
      kept[e] = !f.greedy && i < vocab && key >= threshold &&
                (f.min_p == 0.f || __expf((v[e] - st.max) * f.inv_temp) >= f.min_p);
    }
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      if (!(kept[4 * q] || kept[4 * q + 1] || kept[4 * q + 2] || kept[4 * q + 3])) continue;
      const philox::Uint4 r = philox::random_block(seed, step, uint32_t((c * N) / 4 + q));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int e = 4 * q + j;
        if (!kept[e]) continue;
        const float g = gumbel_from_uniform(philox::uniform_open(philox::lane(r, j)));
        const Best cand{(v[e] - st.max) * f.inv_temp + g, c * N + e};
        if (better(cand, best)) best = cand;
      }
    }
  });
  return best;
}

// When the N-th largest key has more ties than fit, take the lowest-index
// ones: an ordered pass with a block-wide exclusive scan per iteration.
template <int N, typename T>
__device__ void gather_top_ties(const T* row, int64_t vocab, bool aligned, uint32_t top_key,
                                int need, TopList& list, int* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t num_chunks = (vocab + N - 1) / N;
  const int first = list.count;
  int base = 0;
  for (int64_t c0 = 0; c0 < num_chunks && base < need; c0 += kThreads) {
    const int64_t c = c0 + threadIdx.x;
    float v[N];
    int mine = 0;
    if (c < num_chunks) {
      load_chunk<N>(row, vocab, c, aligned, v);
#pragma unroll
      for (int e = 0; e < N; ++e) mine += (c * N + e < vocab && float_key(v[e]) == top_key);
    }
    int incl = mine;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += up;
    }
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    int warp_base = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      warp_base += w < warp ? scratch[w] : 0;
      total += scratch[w];
    }
    int pos = base + warp_base + incl - mine;
    if (mine > 0) {
#pragma unroll
      for (int e = 0; e < N; ++e) {
        if (c * N + e < vocab && float_key(v[e]) == top_key) {
          if (pos < need && first + pos < kSampleMaxTop)
            list.index[first + pos] = c * N + e, list.value[first + pos] = v[e];
          ++pos;
        }
      }
    }
    base += total;
    __syncthreads();  // scratch is rewritten next iteration
  }
  if (threadIdx.x == 0) list.count = first + (need < base ? need : base);
  __syncthreads();
}

// Writes the gathered top list sorted (value descending, index ascending).
__device__ __forceinline__ void write_top(const TopList& list, int num_top, float log_norm,
                                          int64_t* ids, float* values) {
  const int filled = list.count < num_top ? list.count : num_top;
  const int t = threadIdx.x;
  if (t >= num_top) return;
  if (t >= filled) {  // only for rows with NaN/+inf logits
    ids[t] = 0;
    values[t] = -INFINITY;
    return;
  }
  int rank = 0;
  for (int j = 0; j < filled; ++j)
    rank += list.value[j] > list.value[t] ||
            (list.value[j] == list.value[t] && list.index[j] < list.index[t]);
  ids[rank] = list.index[t];
  values[rank] = list.value[t] - log_norm;
}

// Two blocks per SM (about 100 KB of shared memory each) keep up to 264 rows
// in flight on an H100.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    sample_kernel(const T* __restrict__ logits, int64_t vocab, SamplingParams p,
                  SampleOutputs out) {
  constexpr int N = VecWidth<T>::value;
  extern __shared__ int32_t hist[];
  __shared__ SelectShared sh;
  __shared__ Stats stats_scratch[kWarps];
  __shared__ Best best_scratch[kWarps];
  __shared__ int scan_scratch[kWarps];
  __shared__ TopList list;
  const int64_t r = blockIdx.x;
  const T* row = logits + r * vocab;
  const bool aligned = reinterpret_cast<uintptr_t>(row) % 16 == 0;
  const RowFilter f = make_row_filter(p.temperatures[r], p.top_ks[r], p.top_ps[r], p.min_ps[r], vocab);
  const int num_top = int(out.num_top);
  if (threadIdx.x == 0) list.count = 0;

  const Stats st = row_stats<N>(row, vocab, aligned, f, stats_scratch);
  if (f.select || num_top > 0) radix_selects<N>(row, vocab, aligned, f, st, num_top, hist, sh);
  const uint32_t threshold = f.select ? sh.sample.prefix : 0u;
  const bool all_ties_fit = sh.top.count_above + sh.top.count_at <= num_top;
  Best best{-INFINITY, INT64_MAX};
  if (!f.greedy || num_top > 0) {
    best = sample_pass<N>(row, vocab, aligned, f, st, threshold, num_top > 0, sh.top.prefix,
                          all_ties_fit, p.seeds[r], p.steps[r], list);
    best = block_best(best, best_scratch);
  }
  __syncthreads();
  if (num_top > 0 && !all_ties_fit)
    gather_top_ties<N>(row, vocab, aligned, sh.top.prefix, num_top - list.count, list,
                       scan_scratch);
  const float log_norm = st.max + __logf(st.sum1);
  if (threadIdx.x == 0) {
    const int64_t greedy_token = st.argmax < vocab ? st.argmax : 0;
    const int64_t token = !f.greedy && best.index < vocab ? best.index : greedy_token;
    out.tokens[r] = token;
    out.logprobs[r] = to_float(row[token]) - log_norm;
  }
  if (num_top > 0)
    write_top(list, num_top, log_norm, out.top_ids + r * num_top, out.top_logprobs + r * num_top);
}

template <typename T>
cudaError_t launch_sample(const T* logits, int64_t batch, int64_t vocab,
                          const SamplingParams& params, const SampleOutputs& out,
                          cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(
      sample_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kHistBytes));
  if (err != cudaSuccess) return err;
  sample_kernel<T><<<dim3(unsigned(batch)), kThreads, kHistBytes, stream>>>(logits, vocab,
                                                                            params, out);
  return cudaGetLastError();
}

// One block per row; the bias (a second pass) follows a barrier so that it
// lands after the penalties on shared tokens. Offsets are clamped and
// out-of-range ids skipped, so unchecked inputs never write out of bounds.
template <typename T>
__global__ void apply_penalties_kernel(T* __restrict__ logits, int64_t vocab, int64_t nnz,
                                       int64_t nnz_bias, PenaltyParams p) {
  const int64_t r = blockIdx.x;
  T* x = logits + r * vocab;
  const auto clamp = [](int64_t v, int64_t hi) { return v < 0 ? 0 : v > hi ? hi : v; };
  const int64_t begin = clamp(p.cu_token_rows[r], nnz), end = clamp(p.cu_token_rows[r + 1], nnz);
  const float rep = p.repetition[r], pres = p.presence[r], freq = p.frequency[r];
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const int64_t id = p.token_ids[j];
    if (id < 0 || id >= vocab) continue;
    x[id] = from_float<T>(penalize(to_float(x[id]), rep, pres, freq, p.output_counts[j]));
  }
  __syncthreads();
  const int64_t bias_begin = clamp(p.cu_bias_rows[r], nnz_bias);
  const int64_t bias_end = clamp(p.cu_bias_rows[r + 1], nnz_bias);
  for (int64_t j = bias_begin + threadIdx.x; j < bias_end; j += blockDim.x) {
    const int64_t id = p.bias_token_ids[j];
    if (id < 0 || id >= vocab) continue;
    x[id] = from_float<T>(__fadd_rn(to_float(x[id]), p.bias_values[j]));
  }
}

template <typename T>
cudaError_t launch_apply_penalties(T* logits, int64_t batch, int64_t vocab, int64_t nnz,
                                   int64_t nnz_bias, const PenaltyParams& params,
                                   cudaStream_t stream) {
  if (batch == 0 || (nnz == 0 && nnz_bias == 0)) return cudaSuccess;
  apply_penalties_kernel<T><<<dim3(unsigned(batch)), 128, 0, stream>>>(logits, vocab, nnz,
                                                                       nnz_bias, params);
  return cudaGetLastError();
}

}  // namespace sampling
}  // namespace cuda
}  // namespace pyvlm
