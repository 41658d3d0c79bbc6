// varlen_attention on Hopper's warpgroup MMA (sm_90a): the vision towers'
// non-causal attention within packed segments, fp16/bf16, head sizes up to
// 128 (a multiple of 8; padded to a multiple of 16 with zeros on chip).
//
// FlashAttention-2's algorithm with wgmma in place of mma.sync: a block of
// kRows query rows (two warpgroups of 64) stays in shared memory while key /
// value tiles of BN rows stream through cp.async buffers; each
// warpgroup computes its scores S = Q K^T with wgmma from shared memory,
// runs the online softmax on them in fp32 registers (exp2), and adds P V
// with P straight from those registers. Both warpgroups read the same K/V
// tiles, so a tile's bytes serve 128 query rows. kOverlap adds
// FlashAttention-3's overlap within a warpgroup (attend_key_tiles), on a
// third key/value buffer. Which key-tile width and form run fastest is the
// device sweep's to say (benchmarks/kernels/run_tower_attention_sweep.sh);
// launch_varlen_attention's defaults are a first guess until it has run.
//
// The mma.sync kernel (prefill.cuh) issues about 350 non-MMA instructions
// per 80 MMAs of a 64-key tile and ran the Qwen2-VL tower's attention at
// ~42 TFLOP/s on an H100 (benchmarks/RESULTS.md); a wgmma reads its
// operands from shared memory itself, so a warpgroup issues 5 instructions
// for a 64 x 128 x 80 score tile.
//
// Framework-free: AttentionParams (prefill.cuh), plain pointers, a stream.
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "prefill.cuh"
#include "wgmma.cuh"

namespace pyvlm {
namespace cuda {
namespace sm90 {

constexpr int kWarpgroups = 2;
constexpr int kThreads = 128 * kWarpgroups;
constexpr int kRows = 64 * kWarpgroups;  // query rows per block

// Head size as the tiles hold it: the next multiple of 16 (wgmma's k-step).
constexpr int padded_head_dim(int head_dim) { return (head_dim + 15) / 16 * 16; }

// Key/value buffers: two, or three when a tile's P V overlaps the next
// tile's scores (the V of tile t - 1 is read while tile t + 1 streams in).
constexpr int stages(bool overlap) { return overlap ? 3 : 2; }

template <int DK, int BN, bool kOverlap>
constexpr size_t smem_bytes() {
  return size_t(2) * DK * (kRows + 2 * stages(kOverlap) * BN);  // Q, the K tiles, the V tiles
}

// Copies rows [0, ROWS) of a tile from global rows `first_row` + r (row r
// at base + (first_row + r) * row_stride + head_offset) into the wgmma tile
// layout (wgmma.cuh). Rows >= valid_rows and 16-byte chunks >= real_chunks
// become zeros. Work item i is the tile's i-th 16-byte chunk in memory
// order, so each 8-thread phase fills 128 contiguous bytes (no bank
// conflict) and a warp reads 4 chunks of each of 8 rows.
template <typename T, int ROWS, int DK, int NT>
__device__ __forceinline__ void load_tile(unsigned char* tile, const T* base, int64_t first_row,
                                          int64_t row_stride, int64_t head_offset,
                                          int valid_rows, int real_chunks) {
  constexpr int kChunks = DK / 8;
#pragma unroll
  for (int i = threadIdx.x % NT; i < ROWS * kChunks; i += NT) {
    const int row_in_group = i & 7, rest = i >> 3;
    const int chunk = rest % kChunks, row = (rest / kChunks) * 8 + row_in_group;
    const bool valid = row < valid_rows && chunk < real_chunks;
    const T* src = valid ? base + (first_row + row) * row_stride + head_offset + chunk * 8 : base;
    cp_async16(tile + i * 16, src, valid);
  }
}

#if PYVLM_WGMMA
// Issues (without waiting) the scores of a key tile: s = Q K^T, committed
// as one group. s must not be touched until that group is waited for.
template <typename T, int DK, int BN>
__device__ __forceinline__ void issue_tile_scores(float (&s)[BN / 2], uint32_t q_tile,
                                                  int row_group, uint32_t k_tile) {
  constexpr int kChunks = DK / 8;
  wgmma::wgmma_ss_set<BN, T>(s, wgmma::k_major<kChunks>(q_tile, row_group, 0),
                             wgmma::k_major<kChunks>(k_tile, 0, 0));
#pragma unroll
  for (int kk = 1; kk < DK / 16; ++kk)
    wgmma::wgmma_ss<BN, T>(s, wgmma::k_major<kChunks>(q_tile, row_group, kk),
                           wgmma::k_major<kChunks>(k_tile, 0, kk), 1);
  wgmma::commit();
}

// Scores of this warpgroup's 64 query rows (from the query tile's 8-row
// group `row_group` on) against a key tile: s = Q K^T, unscaled.
template <typename T, int DK, int BN>
__device__ __forceinline__ void tile_scores(float (&s)[BN / 2], uint32_t q_tile, int row_group,
                                            uint32_t k_tile) {
  wgmma::fence();
  issue_tile_scores<T, DK, BN>(s, q_tile, row_group, k_tile);
  wgmma::wait<0>();
  wgmma::pin(s);
}

// The probabilities of a score tile as the A operand of P V, per k-step.
template <typename T, int BN>
__device__ __forceinline__ void probabilities_as_a(const float (&p)[BN / 2],
                                                   uint32_t (&a)[BN / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) wgmma::accumulator_as_a<T>(p, kk, a[kk]);
}

// Issues (without waiting) o += P V for a value tile, committed as one
// group; o and a must not be touched until it is waited for.
template <typename T, int DK, int BN>
__device__ __forceinline__ void issue_tile_values(float (&o)[DK / 2],
                                                  const uint32_t (&a)[BN / 16][4],
                                                  uint32_t v_tile) {
  constexpr int kChunks = DK / 8;
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk)
    wgmma::wgmma_rs_bt<DK, T>(o, a[kk], wgmma::n_major<kChunks>(v_tile, kk), 1);
  wgmma::commit();
}

// o += P V for a value tile, P the probabilities in the scores' registers.
template <typename T, int DK, int BN>
__device__ __forceinline__ void add_tile_values(float (&o)[DK / 2], const float (&p)[BN / 2],
                                                uint32_t v_tile) {
  uint32_t a[BN / 16][4];
  probabilities_as_a<T, BN>(p, a);
  wgmma::pin(o);
  wgmma::fence();
  issue_tile_values<T, DK, BN>(o, a, v_tile);
  wgmma::wait<0>();
  wgmma::pin(o);
}
#endif

// Online softmax state of the two rows a thread holds (see wgmma.cuh's
// accumulator layout: values 4i, 4i+1 are row 0's, 4i+2, 4i+3 row 1's).
struct RowState {
  float max[2] = {-INFINITY, -INFINITY};  // running max of the scaled scores (log2 units)
  float sum[2] = {0.f, 0.f};              // this thread's part of the running sum
};

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Turns a score tile into probabilities (in place), moves the running max
// and rescales the sums by its change; alpha: that change per row, by
// which o must be rescaled before the tile's P V adds to it. Keys >=
// valid_keys of the tile (its first column is key 0) get probability 0;
// every tile has a valid key.
template <int BN>
__device__ __forceinline__ void tile_probabilities(float (&s)[BN / 2], RowState& st,
                                                   int valid_keys, float scale_log2,
                                                   float (&alpha)[2]) {
  const int col0 = 2 * (threadIdx.x % 4);
  if (valid_keys < BN) {
#pragma unroll
    for (int i = 0; i < BN / 2; ++i)
      if (8 * (i / 4) + col0 + (i % 2) >= valid_keys) s[i] = -INFINITY;
  }
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) tile_max[(i / 2) % 2] = fmaxf(tile_max[(i / 2) % 2], s[i]);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float new_max = fmaxf(st.max[r], quad_max(tile_max[r]) * scale_log2);
    alpha[r] = exp2f(st.max[r] - new_max);  // 0 on the first tile (max was -inf)
    st.max[r] = new_max;
    st.sum[r] *= alpha[r];
  }
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) {
    const int r = (i / 2) % 2;
    s[i] = exp2f(fmaf(s[i], scale_log2, -st.max[r]));
    st.sum[r] += s[i];
  }
}

template <int DK>
__device__ __forceinline__ void rescale_rows(float (&o)[DK / 2], const float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < DK / 2; ++i) o[i] *= alpha[(i / 2) % 2];
}

// The key-tile loop of one block, tile t in buffer t % stages:
// - plain: scores of tile t, wait, softmax, P V of tile t, wait;
// - kOverlap (FlashAttention-3's intra-warpgroup overlap): the scores of
//   tile t and the P V of tile t - 1 are issued together, the softmax of
//   tile t runs while that P V is on the tensor cores, and o is rescaled
//   once it has landed; the last tile's P V follows the loop.
// One barrier a tile: after it every warpgroup is done with the tile
// whose buffer the next load refills.
template <typename T, int DK, int BN, bool kOverlap>
__device__ __forceinline__ void attend_key_tiles(const AttentionParams<T>& p, const SeqView& v,
                                                 int kvh, uint32_t q_address,
                                                 unsigned char* k_tiles, unsigned char* v_tiles,
                                                 float (&o)[DK / 2], RowState& st) {
#if PYVLM_WGMMA
  constexpr int kStages = stages(kOverlap), kKVBytes = BN * DK * 2;
  const int num_keys = v.num_keys, num_tiles = (num_keys + BN - 1) / BN;
  const int row_group = (threadIdx.x / 128) * 8, real_chunks = (p.head_dim + 7) / 8;
  auto load_kv = [&](int t) {
    const int b = t % kStages;
    load_tile<T, BN, DK, kThreads>(k_tiles + b * kKVBytes, p.key, v.k_start + int64_t(t) * BN,
                                   p.k_stride_token, kvh * p.k_stride_head, num_keys - t * BN,
                                   real_chunks);
    load_tile<T, BN, DK, kThreads>(v_tiles + b * kKVBytes, p.value, v.k_start + int64_t(t) * BN,
                                   p.v_stride_token, kvh * p.v_stride_head, num_keys - t * BN,
                                   real_chunks);
  };
  auto tile_address = [&](unsigned char* tiles, int t) {
    return wgmma::shared_address(tiles + (t % kStages) * kKVBytes);
  };
  if (num_tiles > 0) load_kv(0);
  cp_async_commit();  // with the query tile the caller issued
  float scores[BN / 2], alpha[2];
  // Tile t's buffers are ready: tile t and Q landed, and every warpgroup is
  // done with tile t + 1 - kStages, whose buffers then take tile t + 1.
  auto next_tile = [&](int t) {
    cp_async_wait<0>();
    wgmma::fence_shared_for_async();
    __syncthreads();
    if (t + 1 < num_tiles) load_kv(t + 1);
    cp_async_commit();
  };
  if constexpr (!kOverlap) {
    for (int t = 0; t < num_tiles; ++t) {
      next_tile(t);
      tile_scores<T, DK, BN>(scores, q_address, row_group, tile_address(k_tiles, t));
      tile_probabilities<BN>(scores, st, num_keys - t * BN, p.scale_log2, alpha);
      rescale_rows<DK>(o, alpha);
      add_tile_values<T, DK, BN>(o, scores, tile_address(v_tiles, t));
    }
  } else if (num_tiles > 0) {
    // Tile 0's scores alone (o is still 0), then every later tile's scores
    // with the previous tile's P V, then the last P V: the same wgmma
    // sequence on every pass, which ptxas keeps asynchronous.
    uint32_t a[BN / 16][4];  // the previous tile's P, as P V's A operand
    next_tile(0);
    tile_scores<T, DK, BN>(scores, q_address, row_group, tile_address(k_tiles, 0));
    tile_probabilities<BN>(scores, st, num_keys, p.scale_log2, alpha);
    probabilities_as_a<T, BN>(scores, a);
    for (int t = 1; t < num_tiles; ++t) {
      next_tile(t);
      wgmma::pin(o);
      wgmma::fence();
      issue_tile_scores<T, DK, BN>(scores, q_address, row_group, tile_address(k_tiles, t));
      issue_tile_values<T, DK, BN>(o, a, tile_address(v_tiles, t - 1));
      wgmma::wait<1>();  // the scores (the older group) are in
      wgmma::pin(scores);
      tile_probabilities<BN>(scores, st, num_keys - t * BN, p.scale_log2, alpha);
      wgmma::wait<0>();  // the previous tile's P V is in o
      wgmma::pin(o);
      rescale_rows<DK>(o, alpha);
      probabilities_as_a<T, BN>(scores, a);
    }
    wgmma::pin(o);
    wgmma::fence();
    issue_tile_values<T, DK, BN>(o, a, tile_address(v_tiles, num_tiles - 1));
    wgmma::wait<0>();
    wgmma::pin(o);
  }
  cp_async_wait<0>();
#endif
}

// Grid: (query blocks of kRows, num_heads, sequences); kThreads threads.
// kBlocksPerSM 2 holds a thread to 128 registers so that two blocks share
// an SM (with key tiles of 64: 61 KB of shared memory a block at head size
// 80), one's softmax beside the other's MMAs; 1 leaves ptxas up to 255.
template <typename T, int DK, int BN, bool kOverlap, int kBlocksPerSM>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    varlen_attention_kernel(const AttentionParams<T> p) {
#if PYVLM_WGMMA
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* q_tile = smem;
  unsigned char* k_tiles = smem + kRows * DK * 2;
  unsigned char* v_tiles = k_tiles + stages(kOverlap) * BN * DK * 2;

  const int warpgroup = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y;
  const int kvh = h / (p.num_heads / p.num_kv_heads);
  const int q0 = blockIdx.x * kRows;

  for (int64_t s = blockIdx.z; s < p.num_seqs; s += gridDim.z) {
    SeqView v;
    if (!seq_view<false>(p, s, v) || q0 >= v.q_len) continue;
    __syncthreads();  // the previous sequence's tiles are no longer read
    load_tile<T, kRows, DK, kThreads>(q_tile, p.query, v.q_start + q0, p.q_stride_token,
                                      h * p.q_stride_head, v.q_len - q0,
                                      (p.head_dim + 7) / 8);
    float o[DK / 2];
#pragma unroll
    for (int i = 0; i < DK / 2; ++i) o[i] = 0.f;
    RowState st;
    attend_key_tiles<T, DK, BN, kOverlap>(p, v, kvh, wgmma::shared_address(q_tile), k_tiles,
                                          v_tiles, o, st);

    // Epilogue: o / sum, rows past the segment and padded columns dropped.
    const int col0 = 2 * (lane % 4);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int qi = q0 + warpgroup * 64 + warp * 16 + lane / 4 + 8 * r;
      const float total = quad_sum(st.sum[r]);
      const float inv = total > 0.f ? 1.f / total : 0.f;
      if (qi >= v.q_len) continue;
      T* out = p.out + ((v.q_start + qi) * p.num_heads + h) * int64_t(p.head_dim);
#pragma unroll
      for (int i = 0; i < DK / 8; ++i) {
        const int col = 8 * i + col0;
        if (col < p.head_dim)
          *reinterpret_cast<uint32_t*>(out + col) =
              pack2<T>(o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
      }
    }
  }
#else
  __trap();  // built without sm_90a code: the adapter never launches this (PYVLM_HAS_SM90A)
#endif
}

// Whether this kernel takes the call: fp16/bf16, head_dim a multiple of 8
// up to 128, 16-byte aligned rows (vec_ok), and an sm_90 device (the
// caller's: the kernel exists only in an sm_90a build).
template <typename T>
bool takes(const AttentionParams<T>& p, int device_major, int device_minor) {
  return !std::is_same_v<T, float> && device_major == 9 && device_minor == 0 && p.vec_ok &&
         p.head_dim % 8 == 0 && p.head_dim >= 8 && p.head_dim <= 128 && p.num_kv_heads > 0 &&
         p.num_heads % p.num_kv_heads == 0;
}

template <typename T, int DK, int BN, bool kOverlap, int kBlocksPerSM>
void launch_dk(const AttentionParams<T>& p, int64_t max_seqlen_q, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((max_seqlen_q + kRows - 1) / kRows),
                  static_cast<unsigned>(p.num_heads),
                  static_cast<unsigned>(std::min<int64_t>(p.num_seqs, 65535)));
  constexpr size_t smem = smem_bytes<DK, BN, kOverlap>();
  auto kernel = varlen_attention_kernel<T, DK, BN, kOverlap, kBlocksPerSM>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       static_cast<int>(smem));
  kernel<<<grid, kThreads, smem, stream>>>(p);
}

// Launches the kernel for a call that takes() accepts: key tiles of BN,
// P V overlapped with the next scores or not, kBlocksPerSM blocks an SM.
template <typename T, int BN = 128, bool kOverlap = false, int kBlocksPerSM = 1>
void launch_varlen_attention(const AttentionParams<T>& p, int64_t max_seqlen_q,
                             cudaStream_t stream) {
  if (p.num_seqs == 0 || p.total_q == 0 || max_seqlen_q == 0 || p.num_heads == 0) return;
  if constexpr (!std::is_same_v<T, float>) {
    switch (padded_head_dim(p.head_dim)) {
      case 16: case 32: case 48: case 64:
        return launch_dk<T, 64, BN, kOverlap, kBlocksPerSM>(p, max_seqlen_q, stream);
      case 80:
        return launch_dk<T, 80, BN, kOverlap, kBlocksPerSM>(p, max_seqlen_q, stream);
      case 96:
        return launch_dk<T, 96, BN, kOverlap, kBlocksPerSM>(p, max_seqlen_q, stream);
      default:
        return launch_dk<T, 128, BN, kOverlap, kBlocksPerSM>(p, max_seqlen_q, stream);
    }
  }
}

}  // namespace sm90
}  // namespace cuda
}  // namespace pyvlm
