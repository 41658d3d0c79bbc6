// CUDA paged decode attention (flash-decoding). Framework-free: plain
// pointers, sizes and a stream.
//
// One CTA per (sequence, KV head, head chunk, context split) serves every
// query head of that GQA group, so each cached K/V byte is read from memory
// once. Two kernels:
//
// - Tensor-core (16-bit types, head_dim <= 128): the group's query heads are
//   the M = 16 rows of mma.m16n8k16 (FA2's packing of heads for decode). Each
//   warp streams its own chunks of tokens through a private cp.async
//   pipeline (kStages deep, only __syncwarp between stages, one block-table
//   read per page per warp, prefetched a chunk ahead), because CTA-wide
//   barriers per tile and per-copy page lookups left the memory system idle.
//   The warps' softmax states merge once, at the end.
// - SIMT (fp32, head_dim up to 256): thread (x, y, z) owns dims [8x, 8x + 8)
//   of query head y and the z-th slice of each tile's tokens, with a
//   CTA-wide three-stage pipeline.
//
// Both keep an fp32 online softmax (Milakov & Gimelshein 2018). When there
// are too few CTAs to fill the GPU, the context is split into partitions
// whose partial results a second kernel merges through their log-sum-exps
// (flash-decoding, Dao et al. 2023). Each CTA sizes its work from seq_lens
// read on the device, so a CUDA graph captured with full-width block tables
// replays correctly for any lengths.
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
namespace decode_impl {

constexpr int kDecodeMaxSplits = 256;
constexpr int kMmaRows = 16;        // query heads per CTA of the tensor-core kernel (the mma's M)
constexpr int kMmaMaxDim = 128;     // largest head_dim of the tensor-core kernel
constexpr int kMaxThreadsPerSm = 2048;    // sm_80 and sm_90
constexpr int kRegistersPerSm = 65536;    // sm_80 and sm_90
constexpr int kReservedSmemPerCta = 1024;  // the runtime's own share per CTA (sm_80+)
constexpr int kHopperSmemPerSm = 233472;   // 228 KB
// The tensor-core kernel's launch bounds leave it at least this many
// registers a thread (it spilled at 80), which caps its residency.
constexpr int kMmaMinRegisters = 128;

constexpr int max_ctas_by_registers(int threads) {
  return kRegistersPerSm / (threads * kMmaMinRegisters);
}

// SIMT kernel
constexpr int kSimtStages = 3;          // cp.async pipeline depth
constexpr int kSimtStageBytes = 16384;  // K + V bytes per stage (target)
constexpr int kSimtMaxThreads = 512;
constexpr int kSimtMinThreads = 128;
constexpr int kTokensPerStep = 4;       // scores per online-softmax update

// What the planner needs to know about the device.
struct DecodeDevice {
  int num_sms;
  int smem_per_sm;  // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  int cc_major;     // compute capability; 9 enables programmatic dependent launch
};

// How the tensor-core kernel splits contexts when (sequence, KV head) CTAs
// alone would leave SMs idle.
struct DecodeSplitPolicy {
  float fill;                // aim for fill * (resident CTAs per SM) * num_sms CTAs
  int min_chunks_per_warp;   // each split gives every warp at least this many chunks
  bool overlap_merge_launch; // launch the merge as a programmatic dependent (sm_90)
};

constexpr DecodeSplitPolicy kDefaultSplitPolicy{1.f, 2, true};

// Launch geometry, chosen on the host by plan_paged_decode.
struct DecodePlan {
  bool use_mma;               // tensor-core kernel
  int mma_dim;                // its head_dim bucket: 64 or 128
  int heads_per_cta;          // query heads of the GQA group served by one CTA
  int num_head_chunks;        // CTAs sharing one (sequence, KV head) when the group is large
  int num_threads;
  int tile;                   // tokens per CTA step; a split is whole tiles
  int num_splits;             // context partitions per sequence
  int page_shift;             // log2(page_size), or -1
  bool overlap_merge_launch;  // merge kernel launched as a programmatic dependent
  size_t smem_bytes;
  // SIMT kernel only
  int bdx;               // threads per row: next power of two >= head_dim / 8
  int bdz;               // token slices per tile
  int row_chunks;        // 16-byte chunks per cached row
  int row_chunks_shift;  // log2(row_chunks), or -1
};

// ---------------------------------------------------------------------------
// Planning (host)
// ---------------------------------------------------------------------------

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

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Split the context only while `ctas` (one per sequence, KV head and head
// chunk) fall short of target_ctas, and keep >= min_tiles tiles per split.
// max_context is the block tables' width in tokens: the lengths live on the
// device, and each CTA divides its own sequence's length by num_splits.
inline int plan_num_splits(int64_t ctas, int64_t max_context, int tile, int64_t target_ctas,
                           int min_tiles) {
  int64_t splits = target_ctas / std::max<int64_t>(1, ctas);
  splits = std::min<int64_t>(splits, ceil_div(max_context, int64_t(min_tiles) * tile));
  return static_cast<int>(std::clamp<int64_t>(splits, 1, kDecodeMaxSplits));
}

// Tensor-core CTAs of `threads` threads and `smem` bytes that fit on one SM
// at once.
inline int resident_ctas_per_sm(const DecodeDevice& dev, size_t smem, int threads) {
  const int by_smem = dev.smem_per_sm / static_cast<int>(smem + kReservedSmemPerCta);
  const int by_threads = kMaxThreadsPerSm / threads;
  return std::max(1, std::min({by_smem, by_threads, max_ctas_by_registers(threads)}));
}

// Compile-time shape of the tensor-core kernel. The sweep benchmark
// (benchmarks/kernels/paged_decode_sweep.cu) times several; plan_paged_decode uses
// DefaultMmaDecodeConfig.
template <int Warps, int Stages, int ChunkTokens>
struct MmaDecodeConfig {
  static constexpr int kWarps = Warps;              // each with its own pipeline
  static constexpr int kStages = Stages;            // chunks staged per warp
  static constexpr int kChunkTokens = ChunkTokens;  // tokens per warp per stage
  static constexpr int kThreads = 32 * Warps;
  static constexpr int kCtaTokens = Warps * ChunkTokens;  // the plan's tile
  // A chunk spans at most 32 pages, so one lane can hold each page's id.
  static_assert(ChunkTokens % 16 == 0 && ChunkTokens <= 32, "chunks of 16 or 32 tokens");
  static_assert(Stages >= 2, "a pipeline needs two stages");
};

// 4 warps x 3 stages of 16 tokens: 102 KB of shared memory at head_dim 128,
// so two CTAs (8 warps, 16 chunks = 128 KB in flight) share an SM.
using DefaultMmaDecodeConfig = MmaDecodeConfig<4, 3, 16>;

// Shared memory of the tensor-core kernel for head_dim bucket DP: per warp
// kStages K stages then kStages V stages of kChunkTokens rows; later the
// warps' states for the final merge.
template <int DP, class Cfg>
struct MmaDecodeSmem {
  // One 16-byte pad per row makes the row an odd number of 16-byte chunks,
  // so the 8 rows an ldmatrix reads fall in distinct banks.
  static constexpr int kRowElems = DP + 8;
  static constexpr int kStageElems = Cfg::kChunkTokens * kRowElems;
  static constexpr int kWarpElems = 2 * Cfg::kStages * kStageElems;
  static constexpr size_t kPipelineBytes = size_t(Cfg::kWarps) * kWarpElems * 2;
  static constexpr size_t kMergeBytes = size_t(Cfg::kWarps) * kMmaRows * (DP + 2) * sizeof(float);
  static constexpr size_t kBytes = kPipelineBytes > kMergeBytes ? kPipelineBytes : kMergeBytes;
  // Launch bound: what fits on a Hopper SM, so that registers do not cap
  // residency below what resident_ctas_per_sm plans with.
  static constexpr int kHopperCtasPerSm =
      std::max(1, std::min(kHopperSmemPerSm / int(kBytes + kReservedSmemPerCta),
                           max_ctas_by_registers(Cfg::kThreads)));
};

inline int mma_dim_bucket(int64_t head_dim) { return head_dim <= 64 ? 64 : kMmaMaxDim; }

template <class Cfg>
size_t mma_smem_bytes(int mma_dim) {
  return mma_dim == 64 ? MmaDecodeSmem<64, Cfg>::kBytes : MmaDecodeSmem<kMmaMaxDim, Cfg>::kBytes;
}

// Tensor-core plan: up to 16 query heads per CTA (larger groups take several
// head chunks), Cfg's warps and pipeline, splits from `policy`. Requires a
// 16-bit T and 8 <= head_dim <= 128, a multiple of 8.
template <typename T, class Cfg>
DecodePlan plan_paged_decode_mma(const PagedDecodeArgs<T>& a, const DecodeDevice& dev,
                                 const DecodeSplitPolicy& policy) {
  static_assert(sizeof(T) == 2, "the tensor-core kernel takes 16-bit types");
  DecodePlan p{};
  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);
  p.use_mma = true;
  p.mma_dim = mma_dim_bucket(a.head_dim);
  p.num_head_chunks = static_cast<int>(ceil_div(group, kMmaRows));
  p.heads_per_cta = static_cast<int>(ceil_div(group, p.num_head_chunks));
  p.num_threads = Cfg::kThreads;
  p.tile = Cfg::kCtaTokens;
  p.page_shift = log2_if_pow2(a.page_size);
  p.smem_bytes = mma_smem_bytes<Cfg>(p.mma_dim);
  const int64_t slots =
      int64_t(dev.num_sms) * resident_ctas_per_sm(dev, p.smem_bytes, p.num_threads);
  p.num_splits = plan_num_splits(a.num_seqs * a.num_kv_heads * p.num_head_chunks,
                                 a.max_pages_per_seq * a.page_size, p.tile,
                                 static_cast<int64_t>(policy.fill * slots),
                                 policy.min_chunks_per_warp);
  p.overlap_merge_launch = policy.overlap_merge_launch && dev.cc_major >= 9;
  return p;
}

// SIMT plan for any T and head_dim % 8 == 0, 8 <= head_dim <= 256: splits
// until ~4 CTAs per SM, keeping >= 4 tiles per split.
template <typename T>
DecodePlan plan_paged_decode_simt(const PagedDecodeArgs<T>& a, const DecodeDevice& dev) {
  DecodePlan p{};
  const int d = static_cast<int>(a.head_dim);
  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);
  p.bdx = ceil_pow2(d / 8);
  p.num_head_chunks = static_cast<int>(ceil_div(group, kSimtMaxThreads / p.bdx));
  p.heads_per_cta = static_cast<int>(ceil_div(group, p.num_head_chunks));
  p.bdz = floor_pow2(std::max(1, kSimtMinThreads / (p.bdx * p.heads_per_cta)));
  p.num_threads = (p.bdx * p.heads_per_cta * p.bdz + 31) / 32 * 32;
  const int row_bytes = d * static_cast<int>(sizeof(T));
  const int step = kTokensPerStep * p.bdz;
  p.tile = step * std::max(1, kSimtStageBytes / (2 * row_bytes * step));
  p.row_chunks = row_bytes / 16;
  p.row_chunks_shift = log2_if_pow2(p.row_chunks);
  p.page_shift = log2_if_pow2(a.page_size);
  p.num_splits = plan_num_splits(a.num_seqs * a.num_kv_heads * p.num_head_chunks,
                                 a.max_pages_per_seq * a.page_size, p.tile,
                                 4 * int64_t(dev.num_sms), 4);
  p.overlap_merge_launch = dev.cc_major >= 9;
  const size_t pipeline = size_t(kSimtStages) * 2 * p.tile * row_bytes;
  const size_t merge = size_t(p.bdz) * p.heads_per_cta * (d + 2) * sizeof(float);
  p.smem_bytes = std::max(pipeline, merge);
  return p;
}

// The plan the adapter launches. Requires head_dim % 8 == 0 and
// 8 <= head_dim <= 256 (checked by the adapter).
template <typename T>
DecodePlan plan_paged_decode(const PagedDecodeArgs<T>& a, const DecodeDevice& dev) {
  if constexpr (sizeof(T) == 2) {
    if (a.head_dim <= kMmaMaxDim)
      return plan_paged_decode_mma<T, DefaultMmaDecodeConfig>(a, dev, kDefaultSplitPolicy);
  }
  return plan_paged_decode_simt(a, dev);
}

// ---------------------------------------------------------------------------
// Device helpers shared by both kernels
// ---------------------------------------------------------------------------

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

// A decode CTA lets the merge kernel be scheduled as soon as it starts
// (allow_dependent_launch, common.cuh), so the merge's launch latency hides
// behind the decode; the merge then waits for the decode grid to finish and
// flush.

// What one CTA computes: (sequence, KV head, head chunk, context split) and
// the token range [start, end) of its partition (empty when start >= end).
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

// Writes one finished 8-dim piece of output row `row` (sequence * num_heads
// + head): normalized into out, or with num_splits > 1 as this split's
// partial, the piece at dim 0 also writing its log2-sum-exp.
template <typename T>
__device__ __forceinline__ void write_output_piece(const PagedDecodeArgs<T>& a,
                                                   const DecodePlan& p, int split, int64_t row,
                                                   int dim0, float (&o)[8], float max,
                                                   float sum, float* part_out,
                                                   float* part_lse) {
  const float inv = sum > 0.f ? 1.f / sum : 0.f;  // empty context -> zeros
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] *= inv;
  if (p.num_splits == 1) {
    store8(a.out + row * a.head_dim + dim0, o);
    return;
  }
  const int64_t part_row = row * p.num_splits + split;
  store8(part_out + part_row * a.head_dim + dim0, o);
  if (dim0 == 0) part_lse[part_row] = sum > 0.f ? max + log2f(sum) : -INFINITY;
}

// ---------------------------------------------------------------------------
// SIMT kernel
// ---------------------------------------------------------------------------

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

// Cooperative K/V pipeline over the CTA's partition: kSimtStages - 1 tiles
// in flight while `consume(k_stage, v_stage, num_valid)` reads the oldest.
// Every thread of the block must call it.
template <typename T, typename Consume>
__device__ __forceinline__ void stream_tiles(const PagedDecodeArgs<T>& a, const DecodePlan& p,
                                             const DecodeWork& w, T* k_smem, T* v_smem,
                                             Consume&& consume) {
  const int32_t* block_table = a.block_tables + w.seq * a.block_table_stride;
  const int stage_elems = p.tile * static_cast<int>(a.head_dim);
  if (w.start < w.end) {  // uniform over the block
    const int num_tiles = static_cast<int>(ceil_div(w.end - w.start, p.tile));
#pragma unroll
    for (int s = 0; s < kSimtStages - 1; ++s) {
      if (s < num_tiles)
        load_tile(a, p, block_table, w.kv_head, w.start + int64_t(s) * p.tile, w.end,
                  k_smem + s * stage_elems, v_smem + s * stage_elems);
      cp_async_commit();
    }
    for (int j = 0; j < num_tiles; ++j) {
      const int next = j + kSimtStages - 1;
      if (next < num_tiles) {
        const int stage = next % kSimtStages;
        load_tile(a, p, block_table, w.kv_head, w.start + int64_t(next) * p.tile, w.end,
                  k_smem + stage * stage_elems, v_smem + stage * stage_elems);
      }
      cp_async_commit();
      cp_async_wait<kSimtStages - 1>();  // tile j has landed (this thread's copies)
      __syncthreads();                   // ... and everyone else's
      const int stage = j % kSimtStages;
      const int64_t t0 = w.start + int64_t(j) * p.tile;
      consume(k_smem + stage * stage_elems, v_smem + stage * stage_elems,
              static_cast<int>(min(int64_t(p.tile), w.end - t0)));
      __syncthreads();  // the stage is refilled next iteration
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // shared memory is free for the final merge
}

// The `1` lets ptxas use up to 128 registers (without it, it capped at 64
// and spilled the unrolled K/V loads).
template <typename T, int BDX>
__global__ void __launch_bounds__(kSimtMaxThreads, 1)
    paged_decode_kernel(PagedDecodeArgs<T> a, DecodePlan p, float* __restrict__ part_out,
                        float* __restrict__ part_lse) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  start_after_prerequisite_grid();  // then the merge or the projection may launch
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

  float q[8];
  const float q_scale = a.scale * 1.4426950408889634f;  // scores in log2 units
  const T* q_row = a.query + w.seq * a.query_stride_seq + head * a.query_stride_head + x * 8;
#pragma unroll
  for (int e = 0; e < 8; ++e) q[e] = has_dims ? to_float(q_row[e]) * q_scale : 0.f;

  SoftmaxState st;
  T* k_smem = reinterpret_cast<T*>(smem_raw);
  T* v_smem = k_smem + kSimtStages * p.tile * d;
  const int tpz = p.tile / p.bdz;
  stream_tiles(a, p, w, k_smem, v_smem, [&](const T* k_stage, const T* v_stage, int num_valid) {
    attend_tile<BDX>(k_stage, v_stage, zz * tpz, tpz, num_valid, d, x, has_dims, q, st);
  });
  merge_slices(p, reinterpret_cast<float*>(smem_raw), x, y, z, d, has_dims, st);

  if (z != 0 || head_in_group >= group || !has_dims) return;
  write_output_piece(a, p, w.split, w.seq * a.num_heads + head, x * 8, st.acc, st.max, st.sum,
                     part_out, part_lse);
}

// ---------------------------------------------------------------------------
// Tensor-core kernel
// ---------------------------------------------------------------------------
// S = Q K^T and O += P V run on tensor cores in fp32 accumulators, with K and
// V fed by ldmatrix from the warp's staged chunk; P is rounded to the input
// type for the second product, as in FlashAttention.

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

template <int DP>
__device__ __forceinline__ void init_state(MmaState<DP>& st) {
#pragma unroll
  for (int nt = 0; nt < DP / 8; ++nt) st.o[nt][0] = st.o[nt][1] = st.o[nt][2] = st.o[nt][3] = 0.f;
  st.max[0] = st.max[1] = -INFINITY;
  st.sum[0] = st.sum[1] = 0.f;
}

// Where a warp's K/V rows come from: its sequence's block table, and this
// lane's fixed 16-byte piece of a token's row of the CTA's KV head. Token
// positions fit in 32 bits (seq_lens is int32) and so do offsets within a
// page; only the page's base needs a 64-bit product.
template <typename T>
struct KvSource {
  const T* key;
  const T* value;
  const int32_t* block_table;
  int page_size, page_shift;  // page_shift: log2(page_size), or -1
  int num_pages;    // clamped to int: page ids are int32
  int page_elems;   // page_size * token_elems
  int token_elems;  // num_kv_heads * head_dim: one slot's row of every head
  int lane_offset;  // kv_head * head_dim + the lane's piece
  bool lane_copies;  // the lane's piece lies inside head_dim

  __device__ __forceinline__ int page_of(int token) const {
    return page_shift >= 0 ? token >> page_shift : token / page_size;
  }
};

template <typename T, int DP>
__device__ __forceinline__ KvSource<T> kv_source(const PagedDecodeArgs<T>& a,
                                                 const DecodePlan& p, const DecodeWork& w) {
  const int piece = (threadIdx.x & 31) % (DP / 8);
  KvSource<T> s;
  s.key = a.key_cache;
  s.value = a.value_cache;
  s.block_table = a.block_tables + w.seq * a.block_table_stride;
  s.page_size = static_cast<int>(a.page_size);
  s.page_shift = p.page_shift;
  s.num_pages = static_cast<int>(min(a.num_pages, int64_t(INT_MAX)));
  s.token_elems = static_cast<int>(a.num_kv_heads * a.head_dim);
  s.page_elems = s.page_size * s.token_elems;
  s.lane_offset = static_cast<int>(w.kv_head * a.head_dim) + piece * 8;
  s.lane_copies = piece * 8 < a.head_dim;
  return s;
}

// Block-table entries of the pages that hold tokens [t0, min(t0 + 32, end)):
// lane l gets the l-th page's id (a chunk of <= 32 tokens spans <= 32
// pages), or -1 past the pages the sequence uses, which are never read.
template <typename T>
__device__ __forceinline__ int load_chunk_pages(const KvSource<T>& src, int t0, int end) {
  const int index = src.page_of(t0) + (threadIdx.x & 31);
  return int64_t(index) * src.page_size < end ? __ldg(src.block_table + index) : -1;
}

// Issues the cp.async copies of tokens [t0, t0 + N) into one K and one V
// stage; `pages` is load_chunk_pages(t0). Tokens at or past `end` and pages
// outside the cache (possible only with index checks off) are zero-filled,
// so masked rows hold zeros rather than stale NaNs that 0 * NaN would leak.
template <typename T, int DP, int N>
__device__ __forceinline__ void copy_chunk(const KvSource<T>& src, int t0, int end, int pages,
                                           T* k_stage, T* v_stage) {
  constexpr int kPieces = DP / 8;  // 16-byte pieces per row; divides 32
  constexpr int kRowsPerPass = 32 / kPieces;
  constexpr int kRowElems = DP + 8;
  const int lane = threadIdx.x & 31;
  const int num_valid = min(N, end - t0);
  const int first_slot = t0 - src.page_of(t0) * src.page_size;  // t0's slot in lane 0's page
#pragma unroll
  for (int i = 0; i < N / kRowsPerPass; ++i) {
    const int row = i * kRowsPerPass + lane / kPieces;
    const int page_delta = src.page_of(first_slot + row);  // which lane holds the row's page
    const int slot = first_slot + row - page_delta * src.page_size;
    const int page = __shfl_sync(0xffffffffu, pages, page_delta);
    const T* k = src.key;
    const T* v = src.value;
    int bytes = 0;
    if (row < num_valid && static_cast<unsigned>(page) < static_cast<unsigned>(src.num_pages)) {
      const int64_t offset = int64_t(page) * src.page_elems + slot * src.token_elems +
                             src.lane_offset;
      k += offset;
      v += offset;
      bytes = 16;
    }
    if (src.lane_copies) {
      const int dst = row * kRowElems + (lane % kPieces) * 8;
      cp_async_16(k_stage + dst, k, bytes);
      cp_async_16(v_stage + dst, v, bytes);
    }
  }
}

// S = Q K^T over a chunk of 16 * KT tokens: s[n] holds tokens 8n + 2t and
// 8n + 2t + 1 of rows g and g + 8 (the mma C layout).
template <typename T, int DP, int KT>
__device__ __forceinline__ void chunk_scores(const T* k_stage, int head_dim,
                                             const uint32_t (&qa)[DP / 16][4],
                                             float (&s)[2 * KT][4]) {
  constexpr int kRowElems = DP + 8;
  const int lane = threadIdx.x & 31;
  const int k_steps = (head_dim + 15) / 16;
#pragma unroll
  for (int n = 0; n < 2 * KT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
  for (int kt = 0; kt < KT; ++kt) {
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      if (kk < k_steps) {
        uint32_t b[4];
        const int row = kt * 16 + (lane & 7) + (lane >> 4) * 8;
        const int col = kk * 16 + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(b, k_stage + row * kRowElems + col);
        mma_16816<T>(s[2 * kt], qa[kk], b[0], b[1]);
        mma_16816<T>(s[2 * kt + 1], qa[kk], b[2], b[3]);
      }
    }
  }
}

// One online-softmax step over a chunk: scales the scores to log2 units,
// masks tokens at or past num_valid, rescales the running output and sum to
// the new row maxima, and turns s into exp2(s - max).
template <int DP, int KT>
__device__ __forceinline__ void chunk_softmax(float (&s)[2 * KT][4], int num_valid,
                                              float scale_log2, MmaState<DP>& st) {
  const int t = threadIdx.x & 3;
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tok = n * 8 + 2 * t + (i & 1);
      s[n][i] = tok < num_valid ? s[n][i] * scale_log2 : -INFINITY;
      mx[i >> 1] = fmaxf(mx[i >> 1], s[n][i]);
    }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // A row's scores sit in the 4 lanes of a quad.
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m = fmaxf(st.max[r], mx[r]);
    // While every score so far is masked (m == -inf) nothing accumulates.
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
  for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = i >> 1;
      s[n][i] = s[n][i] == -INFINITY ? 0.f : exp2f(s[n][i] - st.max[r]);
      st.sum[r] += s[n][i];
    }
}

// O += P V over the chunk. The score accumulators' layout is the A fragment
// layout of P with k = token, 16 tokens per k-step.
template <typename T, int DP, int KT>
__device__ __forceinline__ void chunk_accumulate(const T* v_stage, int head_dim,
                                                 const float (&s)[2 * KT][4],
                                                 MmaState<DP>& st) {
  constexpr int kRowElems = DP + 8;
  const int lane = threadIdx.x & 31;
  const int n_tiles = head_dim / 8;
#pragma unroll
  for (int kt = 0; kt < KT; ++kt) {
    const float(&lo)[4] = s[2 * kt];
    const float(&hi)[4] = s[2 * kt + 1];
    const uint32_t pa[4] = {pack2<T>(lo[0], lo[1]), pack2<T>(lo[2], lo[3]),
                            pack2<T>(hi[0], hi[1]), pack2<T>(hi[2], hi[3])};
#pragma unroll
    for (int np = 0; np < DP / 16; ++np) {
      if (2 * np < n_tiles) {
        uint32_t b[4];
        const int row = kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int col = np * 16 + (lane >> 4) * 8;
        ldmatrix_x4_trans(b, v_stage + row * kRowElems + col);
        mma_16816<T>(st.o[2 * np], pa, b[0], b[1]);
        if (2 * np + 1 < n_tiles) mma_16816<T>(st.o[2 * np + 1], pa, b[2], b[3]);
      }
    }
  }
}

template <typename T, int DP, int KT>
__device__ __forceinline__ void attend_chunk(const T* k_stage, const T* v_stage, int num_valid,
                                             int head_dim, float scale_log2,
                                             const uint32_t (&qa)[DP / 16][4],
                                             MmaState<DP>& st) {
  float s[2 * KT][4];
  chunk_scores<T, DP, KT>(k_stage, head_dim, qa, s);
  chunk_softmax<DP, KT>(s, num_valid, scale_log2, st);
  chunk_accumulate<T, DP, KT>(v_stage, head_dim, s, st);
}

// Staged rows are padded past head_dim up to DP; the last k-step reads
// that padding (times zero queries) and it must not hold NaN garbage.
// cp.async never writes it, so zeroing once per warp suffices.
template <typename T, int DP>
__device__ __forceinline__ void zero_row_padding(T* rows, int num_rows, int head_dim) {
  constexpr int kRowElems = DP + 8;
  const int first = head_dim / 8, per_row = DP / 8 - first;
  for (int i = threadIdx.x & 31; i < num_rows * per_row; i += 32) {
    const int row = i / per_row, piece = first + i % per_row;
    *reinterpret_cast<uint4*>(rows + row * kRowElems + piece * 8) = make_uint4(0, 0, 0, 0);
  }
}

// One warp's private pipeline over chunks warp, warp + kWarps, ... of the
// CTA's range (interleaved, so the CTA's warps read neighbouring pages):
// kStages - 1 chunks in flight while `consume(k_stage, v_stage, num_valid)`
// reads the oldest. Page ids are read a chunk ahead of their copies, so
// the block-table load never stalls the issue of a copy.
template <typename T, int DP, class Cfg, typename Consume>
__device__ __forceinline__ void stream_warp_chunks(const KvSource<T>& src, const DecodeWork& w,
                                                   T* k_stages, T* v_stages,
                                                   Consume&& consume) {
  constexpr int S = Cfg::kStages, N = Cfg::kChunkTokens, W = Cfg::kWarps;
  constexpr int kStageElems = MmaDecodeSmem<DP, Cfg>::kStageElems;
  const int warp = threadIdx.x >> 5;
  const int64_t cta_chunks = w.start < w.end ? ceil_div(w.end - w.start, N) : 0;
  const int n = cta_chunks > warp ? static_cast<int>(ceil_div(cta_chunks - warp, W)) : 0;
  // Positions are < end <= INT_MAX wherever a chunk exists (n > 0).
  const int start = static_cast<int>(w.start), end = static_cast<int>(w.end);
  const auto chunk_start = [&](int j) { return start + (j * W + warp) * N; };

  int pages[S];
#pragma unroll
  for (int j = 0; j < S; ++j) pages[j] = j < n ? load_chunk_pages(src, chunk_start(j), end) : -1;
#pragma unroll
  for (int j = 0; j < S - 1; ++j) {
    if (j < n)
      copy_chunk<T, DP, N>(src, chunk_start(j), end, pages[j], k_stages + j * kStageElems,
                           v_stages + j * kStageElems);
    cp_async_commit();
  }
  int next_pages = pages[S - 1];
  for (int j = 0; j < n; ++j) {
    const int ahead = j + S - 1;
    if (ahead < n) {
      const int stage = ahead % S;
      copy_chunk<T, DP, N>(src, chunk_start(ahead), end, next_pages,
                           k_stages + stage * kStageElems, v_stages + stage * kStageElems);
    }
    cp_async_commit();  // one group per iteration, empty or not, keeps the count
    next_pages = ahead + 1 < n ? load_chunk_pages(src, chunk_start(ahead + 1), end) : -1;
    cp_async_wait<S - 1>();  // chunk j has landed (this lane's copies)
    __syncwarp();            // ... and the other lanes'
    const int stage = j % S;
    consume(k_stages + stage * kStageElems, v_stages + stage * kStageElems,
            min(N, end - chunk_start(j)));
    __syncwarp();  // every lane is done reading the stage refilled next
  }
}

// Merges the warps' states through shared memory and writes each row of
// the CTA's heads: normalized to out, or as a partial with its lse.
template <typename T, int DP, int W>
__device__ __forceinline__ void finish_mma(const PagedDecodeArgs<T>& a, const DecodePlan& p,
                                           const DecodeWork& w, int64_t first_head,
                                           int num_rows, MmaState<DP>& st, float* smem,
                                           float* part_out, float* part_lse) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int n_tiles = static_cast<int>(a.head_dim) / 8;
  float* o_smem = smem;                       // [W][16][DP]
  float* stats = smem + W * kMmaRows * DP;    // [W][16][2]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st.sum[r] += __shfl_xor_sync(0xffffffffu, st.sum[r], 1);
    st.sum[r] += __shfl_xor_sync(0xffffffffu, st.sum[r], 2);
    const int row = g + 8 * r;
#pragma unroll
    for (int nt = 0; nt < DP / 8; ++nt) {
      if (nt < n_tiles) {
        float* dst = o_smem + (warp * kMmaRows + row) * DP + nt * 8 + 2 * t;
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
  for (int i = threadIdx.x; i < num_rows * n_tiles; i += W * 32) {
    const int row = i / n_tiles, c = i % n_tiles;
    float m = -INFINITY;
#pragma unroll
    for (int wi = 0; wi < W; ++wi) m = fmaxf(m, stats[(wi * kMmaRows + row) * 2]);
    float total = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int wi = 0; wi < W; ++wi) {
      const float mw = stats[(wi * kMmaRows + row) * 2];
      const float scale = mw == -INFINITY ? 0.f : exp2f(mw - m);
      total += scale * stats[(wi * kMmaRows + row) * 2 + 1];
      const float* src = o_smem + (wi * kMmaRows + row) * DP + c * 8;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] += scale * src[e];
    }
    write_output_piece(a, p, w.split, w.seq * a.num_heads + first_head + row, c * 8, o, m, total,
                       part_out, part_lse);
  }
}

template <typename T, int DP, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, MmaDecodeSmem<DP, Cfg>::kHopperCtasPerSm)
    paged_decode_mma_kernel(PagedDecodeArgs<T> a, DecodePlan p, float* __restrict__ part_out,
                            float* __restrict__ part_lse) {
  using Smem = MmaDecodeSmem<DP, Cfg>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  start_after_prerequisite_grid();  // then the merge or the projection may launch
  const DecodeWork w = decode_work(a, p);
  const int d = static_cast<int>(a.head_dim);
  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);
  const int first_in_group = w.chunk * p.heads_per_cta;
  const int num_rows = min(p.heads_per_cta, group - first_in_group);
  const int64_t first_head = w.kv_head * group + first_in_group;

  uint32_t qa[DP / 16][4];
  load_query_fragments<T, DP>(a, w.seq, first_head, num_rows, qa);
  MmaState<DP> st;
  init_state(st);

  T* k_stages = reinterpret_cast<T*>(smem_raw) + (threadIdx.x >> 5) * Smem::kWarpElems;
  T* v_stages = k_stages + Cfg::kStages * Smem::kStageElems;
  if (d < DP) zero_row_padding<T, DP>(k_stages, 2 * Cfg::kStages * Cfg::kChunkTokens, d);
  const float scale_log2 = a.scale * 1.4426950408889634f;
  stream_warp_chunks<T, DP, Cfg>(
      kv_source<T, DP>(a, p, w), w, k_stages, v_stages,
      [&](const T* k_stage, const T* v_stage, int num_valid) {
        attend_chunk<T, DP, Cfg::kChunkTokens / 16>(k_stage, v_stage, num_valid, d, scale_log2,
                                                    qa, st);
      });
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with its stages: they hold the merge now
  finish_mma<T, DP, Cfg::kWarps>(a, p, w, first_head, num_rows, st,
                                 reinterpret_cast<float*>(smem_raw), part_out, part_lse);
}

// ---------------------------------------------------------------------------
// Split merge and launch
// ---------------------------------------------------------------------------

// Second pass of split-K: out[row] = sum_i 2^(lse_i - lse) o_i over the
// partitions of each (sequence, head) row. One block of 128 per row.
template <typename T>
__global__ void merge_splits_kernel(T* __restrict__ out, const float* __restrict__ part_out,
                                    const float* __restrict__ part_lse, int num_splits,
                                    int head_dim) {
  __shared__ float weight[kDecodeMaxSplits];
  __shared__ float scratch[32];
  allow_dependent_launch();  // the output projection starts loading its weights
  wait_for_prerequisite_grid();
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

template <typename T>
void launch_merge_splits(const PagedDecodeArgs<T>& a, const DecodePlan& p, const float* part_out,
                         const float* part_lse, cudaStream_t stream) {
  // PYVLM_PDL=0 turns the overlap off here too (programmatic_launch_enabled).
  launch_maybe_programmatic(p.overlap_merge_launch && programmatic_launch_enabled(),
                            merge_splits_kernel<T>,
                            dim3(static_cast<unsigned>(a.num_seqs * a.num_heads)), dim3(128), 0,
                            stream, a.out, part_out, part_lse, p.num_splits,
                            static_cast<int>(a.head_dim));
}

template <typename Kernel, typename T>
void launch_decode_kernel(Kernel kernel, const PagedDecodeArgs<T>& a, const DecodePlan& p,
                          float* part_out, float* part_lse, cudaStream_t stream) {
  if (p.smem_bytes > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(p.smem_bytes));
  const dim3 grid(static_cast<unsigned>(a.num_seqs * a.num_kv_heads * p.num_head_chunks),
                  static_cast<unsigned>(p.num_splits));
  launch_programmatic(kernel, grid, dim3(p.num_threads), p.smem_bytes, stream, a, p, part_out,
                      part_lse);
  if (p.num_splits > 1) launch_merge_splits(a, p, part_out, part_lse, stream);
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

// Launches a plan made by plan_paged_decode_mma<T, Cfg>.
template <typename T, class Cfg>
void launch_paged_decode_mma(const PagedDecodeArgs<T>& a, const DecodePlan& p, float* part_out,
                             float* part_lse, cudaStream_t stream) {
  if (p.mma_dim == 64)
    return launch_decode_kernel(paged_decode_mma_kernel<T, 64, Cfg>, a, p, part_out, part_lse,
                                stream);
  launch_decode_kernel(paged_decode_mma_kernel<T, kMmaMaxDim, Cfg>, a, p, part_out, part_lse,
                       stream);
}

// Launches a plan made by plan_paged_decode. part_out / part_lse: float
// workspaces of num_seqs * num_heads * p.num_splits * head_dim and
// num_seqs * num_heads * p.num_splits elements, needed only when
// p.num_splits > 1. Pointers of out and the caches must be 16-byte aligned.
template <typename T>
void launch_paged_attention_decode(const PagedDecodeArgs<T>& a, const DecodePlan& p,
                                   float* part_out, float* part_lse, cudaStream_t stream) {
  if (a.num_seqs == 0 || a.num_heads == 0) return;
  if constexpr (sizeof(T) == 2) {
    if (p.use_mma)
      return launch_paged_decode_mma<T, DefaultMmaDecodeConfig>(a, p, part_out, part_lse, stream);
  }
  launch_paged_decode_simt(a, p, part_out, part_lse, stream);
}

}  // namespace decode_impl

using decode_impl::DecodeDevice;
using decode_impl::DecodePlan;
using decode_impl::DecodeSplitPolicy;
using decode_impl::DefaultMmaDecodeConfig;
using decode_impl::kDefaultSplitPolicy;
using decode_impl::launch_paged_attention_decode;
using decode_impl::launch_paged_decode_mma;
using decode_impl::launch_paged_decode_simt;
using decode_impl::MmaDecodeConfig;
using decode_impl::plan_paged_decode;
using decode_impl::plan_paged_decode_mma;
using decode_impl::plan_paged_decode_simt;

}  // namespace cuda
}  // namespace pyvlm
