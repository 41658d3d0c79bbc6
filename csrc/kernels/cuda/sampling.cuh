// CUDA token sampling and logit penalties. Framework-free: plain pointers,
// sizes and a stream. Semantics are in ../sampling.h.
//
// sample: one block per row, no host sync, no sort of the row. Passes:
//   1. max, softmax normalisers and first argmax: all a greedy row needs.
//      Each thread's own maximum is a token of the row, so the histogram of
//      those 512 values over the row's bins (sampling_bins.cuh) bounds the
//      cuts: once the maxima in the bins before a bin alone number top_k or
//      weigh top_p, no token from that bin on is kept (likewise for the
//      num_top-th logit).
//   2. Gumbel-max over the kept tokens when there is no top-k / top-p cut,
//      and the gather of every token within the bound into shared memory,
//      with count and mass per bin. When they fit, the cut, the draw and the
//      top log-probs are settled there exactly (sort, prefix sums, the
//      predicate of radix_step): two passes in all.
//   3. Otherwise the bins give the threshold bin and the bins of the top
//      list: a third pass draws over the bins above the threshold bin and
//      gathers the tokens to settle as in 2.
// When even those do not fit, the row takes the radix selects of
// sampling_radix.cuh (five more passes). Masses on the candidate path are
// fixed-point integers, so the cut does not depend on the order of the
// atomics: a seeded draw is deterministic.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../sampling.h"
#include "common.cuh"
#include "sampling_bins.cuh"
#include "sampling_block.cuh"
#include "sampling_radix.cuh"

namespace pyvlm {
namespace cuda {
namespace sampling {

constexpr int kCapacity = 4096;  // candidates settled in shared memory
constexpr int kBinsPerThread = kNumBins / kThreads;
constexpr int kCandidatesPerThread = kCapacity / kThreads;
static_assert(kNumBins % kThreads == 0 && kCapacity % kThreads == 0, "whole items per thread");
static_assert((kCapacity & (kCapacity - 1)) == 0, "the sort pads to a power of two in place");

struct CandidateShared {
  uint64_t candidates[kCapacity];  // pack_candidate
  unsigned long long bin_mass[kNumBins];
  int32_t bin_count[kNumBins];
};

// The candidate path and the radix fallback never run at once.
union DynamicShared {
  CandidateShared cand;
  int32_t radix_hist[kRadixHistWords];
};

struct BlockShared {
  Stats stats[kWarps];
  Best best[kWarps];
  Tally tallies[kWarps];
  float floats[kWarps];
  int ints[kWarps];
  uint32_t keys[kWarps];
  int num_gathered;
  TopList list;
  RadixShared radix;
};

// What a row asks for, and what its passes share.
struct RowPlan {
  RowFilter f;
  int num_top;
  bool with_mass;  // a top-p cut: masses count
  RowBins bins;
  SelectLimits sample, top;
  GumbelRow gumbel;

  __device__ bool gathers() const { return f.select || num_top > 0; }
};

// Pass 1; also returns this thread's own maximum.
template <int N, typename T>
__device__ Stats row_stats(const RowView<T>& row, const RowFilter& f, bool with_sum_t,
                           float& thread_max, Stats* scratch) {
  Stats s = kNoStats;
  for_each_chunk<N>(row, [&](int c, const float (&v)[N]) {
    stats_add_chunk<N>(s, v, c * N, f.inv_temp, with_sum_t);
  });
  thread_max = s.max;
  return block_stats(s, f.inv_temp, with_sum_t, scratch);
}

__device__ __forceinline__ void clear_bins(CandidateShared& cs) {
  for (int b = threadIdx.x; b < kNumBins; b += kThreads) cs.bin_count[b] = 0, cs.bin_mass[b] = 0;
}

__device__ __forceinline__ void add_to_bin(CandidateShared& cs, const RowPlan& plan, float l,
                                           float position) {
  const int b = bin_of(position);
  atomicAdd(&cs.bin_count[b], 1);
  if (plan.with_mass)
    atomicAdd(&cs.bin_mass[b], (unsigned long long)fixed_mass(
                                   relative_prob(l, plan.bins.max, plan.f.inv_temp)));
}

// This thread's bins after scan_bins.
struct BinSlice {
  int first;  // its first bin
  int32_t count[kBinsPerThread];
  Tally above[kBinsPerThread];  // the tokens of all bins before
};

// Turns the histogram into exclusive prefix sums in place (so that any bin's
// tally_before can be read after the next barrier); returns this thread's
// bins and sets `total`.
__device__ __forceinline__ BinSlice scan_bins(CandidateShared& cs, Tally& total,
                                              Tally* scratch) {
  BinSlice s;
  s.first = threadIdx.x * kBinsPerThread;
#pragma unroll
  for (int i = 0; i < kBinsPerThread; ++i) {
    s.count[i] = cs.bin_count[s.first + i];
    s.above[i] = Tally{s.count[i], cs.bin_mass[s.first + i]};
  }
  total = block_exclusive_scan(s.above, scratch);
#pragma unroll
  for (int i = 0; i < kBinsPerThread; ++i)
    cs.bin_count[s.first + i] = s.above[i].count, cs.bin_mass[s.first + i] = s.above[i].mass;
  return s;
}

__device__ __forceinline__ Tally tally_before(const CandidateShared& cs, int b, Tally total) {
  return b < kNumBins ? Tally{cs.bin_count[b], cs.bin_mass[b]} : total;
}

// The first bin whose tokens fail the limits for certain (kNumBins: none).
__device__ __forceinline__ int first_failing_bin(const BinSlice& s, const SelectLimits& lim,
                                                 int* scratch) {
  int first = kNumBins;
#pragma unroll
  for (int i = kBinsPerThread - 1; i >= 0; --i)
    if (!lim.ok(s.above[i].count, s.above[i].mass)) first = s.first + i;
  return block_reduce(first, MinOp{}, kNumBins, scratch);
}

// The bin radix_step settles in: the last non-empty bin before the first
// failing one or, when even the first non-empty bin fails, that one.
__device__ __forceinline__ int threshold_bin(const BinSlice& s, int failing, int* scratch) {
  int last_open = -1, first_filled = kNumBins;
#pragma unroll
  for (int i = 0; i < kBinsPerThread; ++i) {
    if (s.count[i] == 0) continue;
    const int b = s.first + i;
    if (b < failing) last_open = b;
    first_filled = min(first_filled, b);
  }
  last_open = block_reduce(last_open, MaxOp{}, -1, scratch);
  first_filled = block_reduce(first_filled, MinOp{}, kNumBins, scratch);
  return last_open >= 0 ? last_open : first_filled;
}

// The end (a position) of the range pass 2 gathers, from the histogram of the
// thread maxima: tokens from the first bin that fails by the maxima alone on
// cannot be kept or listed (+inf: no bound).
__device__ float gather_end_from_maxima(float thread_max, const RowPlan& plan,
                                        CandidateShared& cs, BlockShared& sh) {
  clear_bins(cs);
  __syncthreads();
  const float x = plan.bins.position(thread_max);
  if (x < INFINITY) add_to_bin(cs, plan, thread_max, x);
  __syncthreads();
  Tally total;
  const BinSlice s = scan_bins(cs, total, sh.tallies);
  int end = 0;
  // With top_p = 0 the first bin fails, yet it holds the maximum, always kept.
  if (plan.f.select) end = max(first_failing_bin(s, plan.sample, sh.ints), 1);
  if (plan.num_top > 0) end = max(end, first_failing_bin(s, plan.top, sh.ints));
  return bin_start(end, INFINITY);
}

// What a candidate pass does with each token, by its position.
struct PassPlan {
  float draw_below;              // Gumbel-max over tokens before this (kept for sure)
  float gather_below;            // gather the tokens before this,
  float gather_from, gather_to;  // and those in [gather_from, gather_to)
  bool histogram;                // count and weigh the gathered tokens per bin

  // Every token with work lies before this (the ranges all start at 0 but
  // [gather_from, gather_to), whose few extra marks are re-checked).
  __device__ float mark_below() const { return fmaxf(draw_below, fmaxf(gather_below, gather_to)); }
};

__device__ __forceinline__ void gather_token(CandidateShared& cs, int& num_gathered,
                                             const RowPlan& plan, bool histogram, float l, int i,
                                             float x) {
  if (histogram) add_to_bin(cs, plan, l, x);
  // Once full, stop taking slots: past the capacity the count only has to
  // show the overflow, and a hot counter would serialise dense rows.
  if (*reinterpret_cast<volatile int*>(&num_gathered) > kCapacity) return;
  const int slot = atomicAdd(&num_gathered, 1);
  if (slot < kCapacity) cs.candidates[slot] = pack_candidate(l, i);
}

// Passes 2 and 3; returns this thread's best draw.
template <int N, typename T>
__device__ Best candidate_pass(const RowView<T>& row, const RowPlan& plan, const PassPlan& pass,
                               CandidateShared& cs, int& num_gathered) {
  const auto drawn = [&](float x) { return x < pass.draw_below; };
  const auto gathered = [&](float x) {
    return x < pass.gather_below || (x >= pass.gather_from && x < pass.gather_to);
  };
  const float mark_below = pass.mark_below();
  Best best = kNoBest;
  for_each_marked_group<N>(
      row,
      [&](int c, const float (&v)[N]) {
        uint32_t bits = 0;
#pragma unroll
        for (int e = 0; e < N; ++e) bits |= uint32_t(plan.bins.position(v[e]) < mark_below) << e;
        return bits;
      },
      [&](int first, const float (&v)[kGroup], uint32_t bits) {
        uint32_t kept = 0;
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          if (!(bits >> j & 1)) continue;
          const float x = plan.bins.position(v[j]);
          if (drawn(x) && min_p_keeps(plan.f, v[j], plan.bins.max)) kept |= 1u << j;
          if (gathered(x)) gather_token(cs, num_gathered, plan, pass.histogram, v[j], first + j, x);
        }
        gumbel_group(best, plan.gumbel, v, kept, first);
      });
  return best;
}

// Where the exact cut is looked for among the sorted candidates: those with
// position in [from, to), after `above` tokens of the bins before.
struct Cut {
  float from, to;
  Tally above;

  __device__ bool holds(const RowBins& bins, uint64_t c) const {
    const float x = bins.position(candidate_logit(c));
    return x >= from && x < to;
  }
};

// A candidate's share of the tallies: one token and its mass.
__device__ __forceinline__ Tally candidate_tally(const RowPlan& plan, uint64_t c) {
  const uint32_t mass =
      plan.with_mass
          ? fixed_mass(relative_prob(candidate_logit(c), plan.bins.max, plan.f.inv_temp))
          : 0u;
  return Tally{1, mass};
}

// The smallest key in the cut that passes the limits, counting the cut's
// larger keys (a running tally over the sorted candidates, each thread
// starting from the scan of those before its own); the largest key in the
// cut when none passes (top_p = 0 keeps the maximum and its ties).
__device__ uint32_t exact_threshold(const uint64_t* cands, int n, const Cut& cut,
                                    const RowPlan& plan, BlockShared& sh) {
  const int first = threadIdx.x * kCandidatesPerThread;
  const int last = min(first + kCandidatesPerThread, n);
  Tally before[1] = {Tally{0, 0}};
  for (int j = first; j < last; ++j)
    if (cut.holds(plan.bins, cands[j])) before[0] = before[0] + candidate_tally(plan, cands[j]);
  block_exclusive_scan(before, sh.tallies);
  Tally above = cut.above + before[0];
  uint32_t min_passing = UINT32_MAX, max_in_cut = 0;
  for (int j = first; j < last; ++j) {
    if (!cut.holds(plan.bins, cands[j])) continue;
    const uint32_t key = candidate_key(cands[j]);
    max_in_cut = max(max_in_cut, key);
    // Equal keys are adjacent; the first of a run sees the tally above them all.
    const bool first_of_key = j == 0 || candidate_key(cands[j - 1]) != key;
    if (first_of_key && plan.sample.ok(above.count, above.mass))
      min_passing = min(min_passing, key);
    above = above + candidate_tally(plan, cands[j]);
  }
  min_passing = block_reduce(min_passing, MinOp{}, UINT32_MAX, sh.keys);
  max_in_cut = block_reduce(max_in_cut, MaxOp{}, 0u, sh.keys);
  return min_passing != UINT32_MAX ? min_passing : max_in_cut;
}

__device__ void draw_candidates(Best& best, const uint64_t* cands, int n, const Cut& cut,
                                uint32_t threshold, const RowPlan& plan) {
  for (int j = threadIdx.x; j < n; j += kThreads) {
    const uint64_t c = cands[j];
    const float l = candidate_logit(c);
    if (candidate_key(c) >= threshold && cut.holds(plan.bins, c) &&
        min_p_keeps(plan.f, l, plan.bins.max))
      gumbel_token(best, plan.gumbel, l, candidate_index(c));
  }
}

// Sorts the gathered candidates and settles the row from them: the exact
// cut, the draw over the kept ones in the cut, and the first num_top as the
// top list (all of the top range was gathered).
template <int N, typename T>
__device__ void settle_candidates(const RowView<T>& row, const RowPlan& plan, const Cut& cut,
                                  int n, CandidateShared& cs, BlockShared& sh, Best& best) {
  sort_descending(cs.candidates, n);
  if (plan.f.select)
    draw_candidates(best, cs.candidates, n, cut, exact_threshold(cs.candidates, n, cut, plan, sh),
                    plan);
  if (plan.num_top == 0) return;
  const int filled = min(n, plan.num_top);
  if (threadIdx.x < filled) {
    sh.list.index[threadIdx.x] = candidate_index(cs.candidates[threadIdx.x]);
    sh.list.value[threadIdx.x] = candidate_logit(cs.candidates[threadIdx.x]);
  }
  if (threadIdx.x == 0) sh.list.count = filled;
  __syncthreads();
  // Fewer finite logits than num_top: the list goes on with -inf ones.
  if (filled < plan.num_top)
    gather_top_ties<N>(row, float_key(-INFINITY), plan.num_top - filled, sh.list, sh.ints);
}

// The third pass, from the histogram of pass 2.
struct BinPass {
  PassPlan pass;
  Cut cut;
  bool fits;  // what it gathers fits in shared memory
};

__device__ BinPass plan_bin_pass(const RowPlan& plan, float gather_end, CandidateShared& cs,
                                 BlockShared& sh) {
  Tally total;
  const BinSlice s = scan_bins(cs, total, sh.tallies);
  BinPass bp{PassPlan{0.f, 0.f, 0.f, 0.f, false}, Cut{0.f, 0.f, Tally{0, 0}}, true};
  int threshold = kNumBins, in_threshold_bin = 0, needed = 0;
  if (plan.f.select) {
    threshold = threshold_bin(s, first_failing_bin(s, plan.sample, sh.ints), sh.ints);
    const Tally above = tally_before(cs, threshold, total);
    in_threshold_bin = tally_before(cs, threshold + 1, total).count - above.count;
    bp.cut = Cut{float(threshold), bin_start(threshold + 1, gather_end), above};
    bp.pass.draw_below = bp.cut.from;
    bp.pass.gather_from = bp.cut.from;
    bp.pass.gather_to = bp.cut.to;
    needed = in_threshold_bin;
  }
  if (plan.num_top > 0) {
    const int top_end = first_failing_bin(s, plan.top, sh.ints);
    bp.pass.gather_below = bin_start(top_end, gather_end);
    needed += tally_before(cs, top_end, total).count - (threshold < top_end ? in_threshold_bin : 0);
  }
  bp.fits = needed <= kCapacity;
  __syncthreads();  // the radix fallback's histograms overlay the bins read above
  return bp;
}

__device__ __forceinline__ void reset_gather(int& num_gathered) {
  if (threadIdx.x == 0) num_gathered = 0;
  __syncthreads();
}

// Passes 2 and on for a row that draws or lists top log-probs; returns this
// thread's best draw and leaves the top list in sh.list.
template <int N, typename T>
__device__ Best sample_row(const RowView<T>& row, const RowPlan& plan, const Stats& st,
                           float thread_max, DynamicShared& dyn, BlockShared& sh) {
  CandidateShared& cs = dyn.cand;
  const bool draws_all = !plan.f.greedy && !plan.f.select;
  if (!plan.gathers())
    return candidate_pass<N>(row, plan, PassPlan{INFINITY, 0.f, 0.f, 0.f, false}, cs,
                             sh.num_gathered);
  const float gather_end = gather_end_from_maxima(thread_max, plan, cs, sh);
  clear_bins(cs);
  reset_gather(sh.num_gathered);
  Best best = candidate_pass<N>(
      row, plan, PassPlan{draws_all ? INFINITY : 0.f, gather_end, 0.f, 0.f, true}, cs,
      sh.num_gathered);
  __syncthreads();
  const int n = sh.num_gathered;
  if (n <= kCapacity) {
    settle_candidates<N>(row, plan, Cut{0.f, INFINITY, Tally{0, 0}}, n, cs, sh, best);
    return best;
  }
  const BinPass bp = plan_bin_pass(plan, gather_end, cs, sh);
  if (!bp.fits)
    return sample_by_radix<N>(row, plan.f, st, plan.gumbel, plan.num_top, dyn.radix_hist,
                              sh.radix, sh.list, sh.ints);
  reset_gather(sh.num_gathered);
  const Best drawn = candidate_pass<N>(row, plan, bp.pass, cs, sh.num_gathered);
  if (better(drawn, best)) best = drawn;
  __syncthreads();
  settle_candidates<N>(row, plan, bp.cut, min(sh.num_gathered, kCapacity), cs, sh, best);
  return best;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    sample_kernel(const T* __restrict__ logits, int64_t vocab, SamplingParams p,
                  SampleOutputs out) {
  constexpr int N = VecWidth<T>::value;
  extern __shared__ uint4 dynamic_smem[];
  DynamicShared& dyn = *reinterpret_cast<DynamicShared*>(dynamic_smem);
  __shared__ BlockShared sh;
  const int64_t r = blockIdx.x;
  const T* data = logits + r * vocab;
  const RowView<T> row{data, int(vocab), reinterpret_cast<uintptr_t>(data) % 16 == 0};
  RowPlan plan;
  plan.f = make_row_filter(p.temperatures[r], p.top_ks[r], p.top_ps[r], p.min_ps[r], vocab);
  plan.num_top = int(out.num_top);
  plan.with_mass = plan.f.select && plan.f.top_p < 1.f;
  float thread_max;
  const Stats st = row_stats<N>(row, plan.f, plan.with_mass, thread_max, sh.stats);
  plan.sample = sample_limits(plan.f, st.sumT);
  plan.top = top_limits(plan.num_top);
  plan.gumbel = GumbelRow{st.max, plan.f.inv_temp, p.seeds[r], p.steps[r]};

  Best best = kNoBest;
  if (!plan.f.greedy || plan.num_top > 0) {
    const float finite_max = thread_max > -INFINITY ? thread_max : INFINITY;
    plan.bins = make_row_bins(st.max, block_reduce(finite_max, MinOp{}, INFINITY, sh.floats),
                              plan.f);
    best = sample_row<N>(row, plan, st, thread_max, dyn, sh);
  }
  best = block_best(best, sh.best);  // ends with a barrier: sh.list is complete
  const float log_norm = st.max + __logf(st.sum1);
  if (threadIdx.x == 0) {
    const int greedy_token = st.argmax < vocab ? st.argmax : 0;
    const int token = !plan.f.greedy && best.index < vocab ? best.index : greedy_token;
    out.tokens[r] = token;
    out.logprobs[r] = to_float(data[token]) - log_norm;
  }
  if (plan.num_top > 0)
    write_top(sh.list, plan.num_top, log_norm, out.top_ids + r * plan.num_top,
              out.top_logprobs + r * plan.num_top);
}

template <typename T>
cudaError_t launch_sample(const T* logits, int64_t batch, int64_t vocab,
                          const SamplingParams& params, const SampleOutputs& out,
                          cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  constexpr size_t kDynamicBytes = sizeof(DynamicShared);
  const cudaError_t err = cudaFuncSetAttribute(
      sample_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kDynamicBytes));
  if (err != cudaSuccess) return err;
  sample_kernel<T><<<dim3(unsigned(batch)), kThreads, kDynamicBytes, stream>>>(logits, vocab,
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
