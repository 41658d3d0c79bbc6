// The CUDA sampler's general path (sampling.cuh), for rows whose candidates
// do not fit in shared memory (huge ties, very flat rows): the radix select of
// ../sampling.h over the 32-bit logit keys, four 8-bit passes for the
// sampling threshold and the num_top-th logit at once, with count (and mass)
// histograms privatised in shared memory (bin * 16 + lane % 16: no bank
// conflicts, at most two lanes per address); then one pass for the Gumbel-max
// draw and the top-logprob gather, and an ordered pass when the num_top-th
// logit has more ties than fit.
#pragma once
#include "sampling_block.cuh"

namespace pyvlm {
namespace cuda {
namespace sampling {

constexpr int kRadixCopies = 16;
constexpr int kRadixHistWords = 3 * kRadixBins * kRadixCopies;  // count, mass, top count

struct RadixShared {
  int32_t bin_count[kRadixBins];
  float bin_mass[kRadixBins];
  int32_t top_bin_count[kRadixBins];
  RadixState sample, top;
};

struct TopList {
  int count;
  int index[kSampleMaxTop];
  float value[kSampleMaxTop];
};

__device__ __forceinline__ void top_push(TopList& list, int i, float l) {
  const int pos = atomicAdd(&list.count, 1);
  if (pos < kSampleMaxTop) list.index[pos] = i, list.value[pos] = l;
}

// Sums lane % 16 copies of bin b over the warp.
__device__ __forceinline__ int32_t radix_bin_sum(const int32_t* h, int b, int lane) {
  return __reduce_add_sync(kFullMask, lane < kRadixCopies ? h[b * kRadixCopies + lane] : 0);
}

// Radix selects for the sampling threshold (if f.select) and the num_top-th
// largest logit (if num_top > 0), sharing the loads; `hist` holds
// kRadixHistWords.
template <int N, typename T>
__device__ void radix_selects(const RowView<T>& row, const RowFilter& f, const Stats& st,
                              int num_top, int32_t* hist, RadixShared& sh) {
  int32_t* h_count = hist;
  float* h_mass = reinterpret_cast<float*>(hist + kRadixBins * kRadixCopies);
  int32_t* h_top = hist + 2 * kRadixBins * kRadixCopies;
  const bool do_sample = f.select, do_top = num_top > 0, use_mass = f.top_p < 1.f;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, copy = lane % kRadixCopies;
  if (threadIdx.x == 0) sh.sample = sh.top = RadixState{0u, 0, 0.f, 0};
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kRadixHistWords; i += kThreads) hist[i] = 0;
    __syncthreads();
    const uint32_t mask = radix_mask(shift);
    const uint32_t sample_prefix = sh.sample.prefix, top_prefix = sh.top.prefix;
    const auto in_sample = [&](uint32_t key) { return do_sample && (key & mask) == sample_prefix; };
    const auto in_top = [&](uint32_t key) { return do_top && (key & mask) == top_prefix; };
    for_each_marked_group<N>(
        row,
        [&](int c, const float (&v)[N]) {
          uint32_t bits = 0;
#pragma unroll
          for (int e = 0; e < N; ++e) {
            const uint32_t key = float_key(v[e]);
            bits |= uint32_t(c * N + e < row.vocab && (in_sample(key) || in_top(key))) << e;
          }
          return bits;
        },
        [&](int first, const float (&v)[kGroup], uint32_t bits) {
#pragma unroll
          for (int j = 0; j < kGroup; ++j) {
            if (!(bits >> j & 1)) continue;
            const uint32_t key = float_key(v[j]);
            const int slot = int((key >> shift) & 0xFFu) * kRadixCopies + copy;
            if (in_sample(key)) {
              atomicAdd(&h_count[slot], 1);
              if (use_mass) atomicAdd(&h_mass[slot], relative_prob(v[j], st.max, f.inv_temp));
            }
            if (in_top(key)) atomicAdd(&h_top[slot], 1);
          }
        });
    __syncthreads();
    for (int b = warp; b < kRadixBins; b += kWarps) {
      const int32_t c = radix_bin_sum(h_count, b, lane);
      const float m = warp_sum(lane < kRadixCopies ? h_mass[b * kRadixCopies + lane] : 0.f);
      const int32_t t = radix_bin_sum(h_top, b, lane);
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

// Gumbel-max over the kept tokens of a sampled row, and the top-N gather
// (tokens above the N-th key, plus its ties when they all fit).
template <int N, typename T>
__device__ Best radix_draw_pass(const RowView<T>& row, const RowFilter& f, const GumbelRow& g,
                                uint32_t threshold, bool do_top, uint32_t top_key,
                                bool all_ties_fit, TopList& list) {
  const auto listed = [&](uint32_t key) {
    return do_top && (key > top_key || (key == top_key && all_ties_fit));
  };
  const auto drawn = [&](uint32_t key) { return !f.greedy && key >= threshold; };
  Best best = kNoBest;
  for_each_marked_group<N>(
      row,
      [&](int c, const float (&v)[N]) {
        uint32_t bits = 0;
#pragma unroll
        for (int e = 0; e < N; ++e) {
          const uint32_t key = float_key(v[e]);
          bits |= uint32_t(c * N + e < row.vocab && (listed(key) || drawn(key))) << e;
        }
        return bits;
      },
      [&](int first, const float (&v)[kGroup], uint32_t bits) {
        uint32_t kept = 0;
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          if (!(bits >> j & 1)) continue;
          const uint32_t key = float_key(v[j]);
          if (listed(key)) top_push(list, first + j, v[j]);
          if (drawn(key) && min_p_keeps(f, v[j], g.max)) kept |= 1u << j;
        }
        gumbel_group(best, g, v, kept, first);
      });
  return best;
}

// Appends to the list, in index order, the first `need` tokens whose key is
// top_key: an ordered pass with a block-wide exclusive scan per iteration,
// which stops as soon as it has them.
template <int N, typename T>
__device__ void gather_top_ties(const RowView<T>& row, uint32_t top_key, int need, TopList& list,
                                int* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_chunks = (row.vocab + N - 1) / N;
  const int first = list.count;
  int base = 0;
  for (int c0 = 0; c0 < num_chunks && base < need; c0 += kThreads) {
    const int c = c0 + threadIdx.x;
    float v[N];
    int mine = 0;
    if (c < num_chunks) {
      chunk_values<N, T>(load_chunk<N>(row, c), v);
#pragma unroll
      for (int e = 0; e < N; ++e) mine += (c * N + e < row.vocab && float_key(v[e]) == top_key);
    }
    int incl = mine;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int up = __shfl_up_sync(kFullMask, incl, o);
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
        if (c * N + e < row.vocab && float_key(v[e]) == top_key) {
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

// The whole draw and top list of a row by radix selects; returns this
// thread's best draw and leaves the top list in `list`.
template <int N, typename T>
__device__ Best sample_by_radix(const RowView<T>& row, const RowFilter& f, const Stats& st,
                                const GumbelRow& g, int num_top, int32_t* hist, RadixShared& sh,
                                TopList& list, int* scratch) {
  radix_selects<N>(row, f, st, num_top, hist, sh);
  const uint32_t threshold = f.select ? sh.sample.prefix : 0u;
  const bool all_ties_fit = sh.top.count_above + sh.top.count_at <= num_top;
  if (threadIdx.x == 0) list.count = 0;
  __syncthreads();
  const Best best = radix_draw_pass<N>(row, f, g, threshold, num_top > 0, sh.top.prefix,
                                       all_ties_fit, list);
  __syncthreads();
  if (num_top > 0 && !all_ties_fit)
    gather_top_ties<N>(row, sh.top.prefix, num_top - list.count, list, scratch);
  return best;
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

}  // namespace sampling
}  // namespace cuda
}  // namespace pyvlm
