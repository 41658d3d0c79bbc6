// CUDA paged_attention_prefill and varlen_attention: FlashAttention-2 style
// tiled kernels (a block of query rows stays on chip while key/value tiles
// stream through double-buffered shared memory; online softmax in fp32).
//
// fp16/bf16 run on tensor cores (mma.sync m16n8k16, fp32 accumulators, the
// score fragments reused in registers as the P operand of P.V, as in
// FlashAttention-2); fp32 runs on CUDA cores. Paged and contiguous K/V differ
// only in how a key's row offset is found (the PAGED template flag).
// Framework-free: plain pointers, sizes, strides and a stream.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace pyvlm {
namespace cuda {

// All pointers are device pointers; strides are in elements.
template <typename T>
struct AttentionParams {
  T* out;  // [total_q, num_heads, head_dim], contiguous
  const T* query;
  int64_t q_stride_token, q_stride_head, total_q;
  const T* key;  // varlen: key rows; paged: key_cache
  const T* value;
  int64_t k_stride_token, k_stride_head, v_stride_token, v_stride_head, total_k;
  const int32_t* cu_seqlens_q;  // [num_seqs + 1]
  int64_t num_seqs;
  int num_heads, num_kv_heads, head_dim;
  float scale_log2;  // scale * log2(e): the softmax runs on exp2
  // Paged only: caches [num_pages, page_size, num_kv_heads, head_dim].
  const int32_t* block_tables;
  int64_t max_pages_per_seq, page_size, num_pages;
  const int32_t* prefix_lens;
  // Varlen only.
  const int32_t* cu_seqlens_k;
  bool vec_ok;  // every row start 16-byte aligned: tiles load with cp.async
};

// ---- small PTX helpers ------------------------------------------------------

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ uint32_t ld_shared_u32(const void* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// c += a (16x16, row) * b (16x8, col) with fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ---- per-sequence view and addressing -----------------------------------

// One sequence as seen by a block, clamped so that bad indices (when the
// adapter's checks are off) never read or write out of bounds.
struct SeqView {
  int64_t q_start;
  int q_len;
  int num_keys;
  int causal_base;  // query i sees keys [0, causal_base + i]; < 0: all keys
  int64_t k_start;  // varlen: first key row
  __device__ __forceinline__ int row_limit(int qi) const {
    return causal_base < 0 ? num_keys : min(num_keys, causal_base + qi + 1);
  }
};

template <bool PAGED, typename T>
__device__ __forceinline__ bool seq_view(const AttentionParams<T>& p, int64_t s, SeqView& v) {
  v.q_start = p.cu_seqlens_q[s];
  const int64_t q_end = min(static_cast<int64_t>(p.cu_seqlens_q[s + 1]), p.total_q);
  if (v.q_start < 0 || q_end <= v.q_start) return false;
  v.q_len = static_cast<int>(q_end - v.q_start);
  if constexpr (PAGED) {
    const int64_t prefix = max(p.prefix_lens[s], 0);
    const int64_t capacity = p.max_pages_per_seq * p.page_size;
    v.num_keys = static_cast<int>(min(prefix + v.q_len, capacity));
    v.causal_base = static_cast<int>(min(prefix, capacity));
    v.k_start = 0;
  } else {
    v.k_start = max(p.cu_seqlens_k[s], 0);
    const int64_t k_end = min(static_cast<int64_t>(p.cu_seqlens_k[s + 1]), p.total_k);
    v.num_keys = static_cast<int>(max(k_end - v.k_start, int64_t(0)));
    v.causal_base = -1;
  }
  return true;
}

// Element offsets of key j's K and V rows for kv head kvh, or -1 (skip: a
// padded key past the block's range, or an invalid page id).
template <bool PAGED, typename T>
__device__ __forceinline__ void key_offsets(const AttentionParams<T>& p, int64_t s, const SeqView& v, int kvh,
                            int j, int keys_needed, int64_t& koff, int64_t& voff) {
  koff = voff = -1;
  if (j >= keys_needed) return;
  if constexpr (PAGED) {
    const int ps = static_cast<int>(p.page_size);
    const int64_t page = p.block_tables[s * p.max_pages_per_seq + j / ps];
    if (page < 0 || page >= p.num_pages) return;
    koff = voff = ((page * ps + j % ps) * p.num_kv_heads + kvh) * p.head_dim;
  } else {
    const int64_t row = v.k_start + j;
    koff = row * p.k_stride_token + kvh * p.k_stride_head;
    voff = row * p.v_stride_token + kvh * p.v_stride_head;
  }
}

// Copies ROWS rows of `padded` (<= DMAX) columns into shared memory (row
// stride LDS); rows with offset < 0 and columns >= head_dim become zeros.
// The row/column split uses the compile-time DMAX (a multiply, not a
// division, per 16-byte chunk: this loop runs for every key tile).
template <typename T, int ROWS, int LDS, int NT, int DMAX>
__device__ __forceinline__ void load_rows(T* smem, const T* base, const int64_t* offs, int padded, int head_dim,
                          bool vec_ok) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int CHUNKS = (DMAX + VEC - 1) / VEC;
  for (int i = threadIdx.x; i < ROWS * CHUNKS; i += NT) {
    const int r = i / CHUNKS, c = (i % CHUNKS) * VEC;
    if (c >= padded) continue;
    T* dst = smem + r * LDS + c;
    const int64_t off = offs[r];
    const bool ok = off >= 0 && c < head_dim;
    if (vec_ok) {
      cp_async16(dst, ok ? base + off + c : base, ok);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) dst[e] = ok ? base[off + c + e] : from_float<T>(0.f);
    }
  }
}

// Offsets of the query rows [q0, q0 + BM) of head h (-1 past the span).
template <int BM, typename T>
__device__ __forceinline__ void query_offsets(const AttentionParams<T>& p, const SeqView& v, int q0, int h,
                              int64_t* qoff) {
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    const int qi = q0 + r;
    qoff[r] = qi < v.q_len ? (v.q_start + qi) * p.q_stride_token + h * p.q_stride_head : -1;
  }
}

// Keys any row of the block [q0, q0 + BM) can see.
template <int BM>
__device__ __forceinline__ int keys_for_block(const SeqView& v, int q0) {
  return v.row_limit(min(q0 + BM, v.q_len) - 1);
}

// The key-tile pipeline shared by both kernels: tile t + 1 streams into one
// buffer (cp.async) while tile t is consumed from the other. consume(t, buf)
// runs with tile t visible in buffer `buf`.
template <bool PAGED, typename T, int BN, int LDS, int NT, int DMAX, typename Consume>
__device__ __forceinline__ void stream_kv_tiles(const AttentionParams<T>& p, int64_t s, const SeqView& v,
                                int kvh, int keys_needed, int padded, T* Ks, T* Vs,
                                int64_t* koff, int64_t* voff, const Consume& consume) {
  const int num_tiles = (keys_needed + BN - 1) / BN;
  auto offsets = [&](int t) {
    for (int r = threadIdx.x; r < BN; r += NT)
      key_offsets<PAGED>(p, s, v, kvh, t * BN + r, keys_needed, koff[(t & 1) * BN + r],
                         voff[(t & 1) * BN + r]);
  };
  auto issue = [&](int t) {
    const int b = t & 1;
    load_rows<T, BN, LDS, NT, DMAX>(Ks + b * BN * LDS, p.key, koff + b * BN, padded, p.head_dim,
                                    p.vec_ok);
    load_rows<T, BN, LDS, NT, DMAX>(Vs + b * BN * LDS, p.value, voff + b * BN, padded, p.head_dim,
                                    p.vec_ok);
    cp_async_commit();
  };
  if (num_tiles == 0) return;
  offsets(0);
  __syncthreads();
  issue(0);
  for (int t = 0; t < num_tiles; ++t) {
    const bool more = t + 1 < num_tiles;
    if (more) offsets(t + 1);
    __syncthreads();  // offsets of tile t + 1 visible
    if (more) {
      issue(t + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile t visible
    consume(t, t & 1);
    __syncthreads();  // buffer t & 1 free for tile t + 2
  }
}

// ---- tensor-core kernel (fp16 / bf16) -----------------------------------

constexpr int kMmaRows = 64;  // query rows per block: 4 warps x 16
constexpr int kMmaThreads = 128;

template <int DMAX>
constexpr int mma_keys_per_tile() {
  return DMAX > 128 ? 32 : 64;
}

template <typename T, int DMAX>
constexpr size_t mma_smem_bytes() {
  constexpr int BN = mma_keys_per_tile<DMAX>(), LDS = DMAX + 8;
  return sizeof(T) * (kMmaRows + 4 * BN) * LDS + sizeof(int64_t) * (4 * BN + kMmaRows);
}

// Grid: (num_heads, query blocks, sequences); each warp owns 16 query rows.
template <typename T, bool PAGED, int DMAX>
__global__ void __launch_bounds__(kMmaThreads)
    attention_mma_kernel(const AttentionParams<T> p) {
  constexpr int BM = kMmaRows, NT = kMmaThreads, BN = mma_keys_per_tile<DMAX>();
  constexpr int LDS = DMAX + 8;  // +16 bytes a row: conflict-free fragment loads
  constexpr bool kQInRegs = DMAX <= 128;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + BM * LDS;
  T* Vs = Ks + 2 * BN * LDS;
  int64_t* koff = reinterpret_cast<int64_t*>(Vs + 2 * BN * LDS);
  int64_t* voff = koff + 2 * BN;
  int64_t* qoff = voff + 2 * BN;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c0 = (lane & 3) * 2;  // fragment row / column pair
  const int h = blockIdx.x;
  const int kvh = h / (p.num_heads / p.num_kv_heads);
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BM;  // longest (causal) blocks first
  const int D = p.head_dim, padded = (D + 15) & ~15;

  for (int64_t s = blockIdx.z; s < p.num_seqs; s += gridDim.z) {
    SeqView v;
    if (!seq_view<PAGED>(p, s, v) || q0 >= v.q_len) continue;
    query_offsets<BM>(p, v, q0, h, qoff);
    __syncthreads();
    load_rows<T, BM, LDS, NT, DMAX>(Qs, p.query, qoff, padded, D, p.vec_ok);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    const T* qrow0 = Qs + (warp * 16 + g) * LDS + c0;
    uint32_t qf[kQInRegs ? DMAX / 16 : 1][4];
    auto q_frag = [&](int ks, uint32_t(&a)[4]) {
      const T* q = qrow0 + ks * 16;
      a[0] = ld_shared_u32(q);
      a[1] = ld_shared_u32(q + 8 * LDS);
      a[2] = ld_shared_u32(q + 8);
      a[3] = ld_shared_u32(q + 8 * LDS + 8);
    };
    if constexpr (kQInRegs) {
#pragma unroll
      for (int ks = 0; ks < DMAX / 16; ++ks)
        if (ks * 16 < D) q_frag(ks, qf[ks]);
    }

    // Lanes 0-7 / 8-15 address keys 0-7 at columns +0 / +8, lanes 16-31 keys
    // 8-15 (the x4 ldmatrix of two 8-key groups of one 16-column step).
    const T* const krow0 = Ks + ((lane >> 4) * 8 + (lane & 7)) * LDS + ((lane >> 3) & 1) * 8;
    float o[DMAX / 8][4];
#pragma unroll
    for (int n = 0; n < DMAX / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const int qi0 = q0 + warp * 16 + g;
    const int lim[2] = {v.row_limit(qi0), v.row_limit(qi0 + 8)};

    auto consume = [&](int t, int buf) {
      const T* krow = krow0 + buf * BN * LDS;
      const T* Vt = Vs + buf * BN * LDS;
      float sc[BN / 8][4];
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < DMAX / 16; ++ks) {
        if (ks * 16 >= D) break;
        uint32_t a[4];
        if constexpr (kQInRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = qf[ks][i];
        } else {
          q_frag(ks, a);
        }
        // One ldmatrix.x4 gives the B fragments of two 8-key groups.
#pragma unroll
        for (int n = 0; n < BN / 8; n += 2) {
          uint32_t b[4];
          ldmatrix_x4(b, krow + n * 8 * LDS + ks * 16);
          mma_16816<T>(sc[n], a, b[0], b[1]);
          mma_16816<T>(sc[n + 1], a, b[2], b[3]);
        }
      }
      // Mask (only a tile that reaches past a row's last key), then the
      // online softmax of this thread's rows g and g + 8.
      const int j0 = t * BN;
      float mx[2] = {m[0], m[1]};
      if (j0 + BN <= min(lim[0], lim[1])) {
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            sc[n][e] *= p.scale_log2;
            mx[e >> 1] = fmaxf(mx[e >> 1], sc[n][e]);
          }
      } else {
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = j0 + n * 8 + c0 + (e & 1);
            sc[n][e] = key < lim[e >> 1] ? sc[n][e] * p.scale_log2 : -INFINITY;
            mx[e >> 1] = fmaxf(mx[e >> 1], sc[n][e]);
          }
      }
      float alpha[2], base[2], sum[2] = {0.f, 0.f};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        base[r] = mx[r] == -INFINITY ? 0.f : mx[r];
        alpha[r] = exp2f(m[r] - base[r]);
        m[r] = mx[r];
      }
#pragma unroll
      for (int n = 0; n < BN / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sc[n][e] = exp2f(sc[n][e] - base[e >> 1]);
          sum[e >> 1] += sc[n][e];
        }
#pragma unroll
      for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + sum[r];
#pragma unroll
      for (int n = 0; n < DMAX / 8; ++n) {
        if (n * 8 >= D) break;
        o[n][0] *= alpha[0];
        o[n][1] *= alpha[0];
        o[n][2] *= alpha[1];
        o[n][3] *= alpha[1];
      }
      // O += P V: the score accumulators of two key groups form P's A fragment.
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const uint32_t pa[4] = {pack2<T>(sc[2 * kk][0], sc[2 * kk][1]),
                                pack2<T>(sc[2 * kk][2], sc[2 * kk][3]),
                                pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
        const T* vrow = Vt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + (lane >> 4) * 8;
#pragma unroll
        for (int dp = 0; dp < DMAX / 16; ++dp) {
          if (dp * 16 >= D) break;
          uint32_t b[4];
          ldmatrix_x4_trans(b, vrow + dp * 16);
          mma_16816<T>(o[2 * dp], pa, b[0], b[1]);
          if (dp * 16 + 8 < D) mma_16816<T>(o[2 * dp + 1], pa, b[2], b[3]);
        }
      }
    };
    stream_kv_tiles<PAGED, T, BN, LDS, NT, DMAX>(p, s, v, kvh, keys_for_block<BM>(v, q0), padded,
                                                 Ks, Vs, koff, voff, consume);

    // Normalize and store rows g and g + 8 of this warp.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
      const int qi = qi0 + 8 * r;
      if (qi >= v.q_len) continue;
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      T* dst = p.out + ((v.q_start + qi) * p.num_heads + h) * D + c0;
#pragma unroll
      for (int n = 0; n < DMAX / 8; ++n) {
        if (n * 8 >= D) break;
        *reinterpret_cast<uint32_t*>(dst + n * 8) =
            pack2<T>(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
      }
    }
    __syncthreads();  // shared memory is reused by the next sequence
  }
}

// ---- CUDA-core kernel (fp32) --------------------------------------------

constexpr int kSimtRows = 16;  // query rows per block: 4 warps x 4 rows
constexpr int kSimtKeys = 32;  // one key per lane
constexpr int kSimtThreads = 128;

template <int DMAX>
constexpr size_t simt_smem_bytes() {
  return sizeof(float) * (kSimtRows + 4 * kSimtKeys) * (DMAX + 4) +
         sizeof(int64_t) * (4 * kSimtKeys + kSimtRows);
}

template <bool PAGED, int DMAX>
__global__ void __launch_bounds__(kSimtThreads)
    attention_simt_kernel(const AttentionParams<float> p) {
  constexpr int BM = kSimtRows, BN = kSimtKeys, NT = kSimtThreads, RPW = BM / 4;
  constexpr int LDS = DMAX + 4;  // float4 reads of K rows hit distinct banks
  constexpr int DC = DMAX / 32;  // output columns per lane
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* Qs = reinterpret_cast<float*>(smem_raw);
  float* Ks = Qs + BM * LDS;
  float* Vs = Ks + 2 * BN * LDS;
  int64_t* koff = reinterpret_cast<int64_t*>(Vs + 2 * BN * LDS);
  int64_t* voff = koff + 2 * BN;
  int64_t* qoff = voff + 2 * BN;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int h = blockIdx.x;
  const int kvh = h / (p.num_heads / p.num_kv_heads);
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BM;
  const int D = p.head_dim;

  for (int64_t s = blockIdx.z; s < p.num_seqs; s += gridDim.z) {
    SeqView v;
    if (!seq_view<PAGED>(p, s, v) || q0 >= v.q_len) continue;
    query_offsets<BM>(p, v, q0, h, qoff);
    __syncthreads();
    load_rows<float, BM, LDS, NT, DMAX>(Qs, p.query, qoff, D, D, p.vec_ok);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    float o[RPW][DC], m[RPW], l[RPW];
    int lim[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.f;
      lim[r] = v.row_limit(q0 + warp * RPW + r);
#pragma unroll
      for (int c = 0; c < DC; ++c) o[r][c] = 0.f;
    }
    auto consume = [&](int t, int buf) {
      const float* Kt = Ks + buf * BN * LDS;
      const float* Vt = Vs + buf * BN * LDS;
      float sc[RPW] = {};
      for (int d = 0; d < D; d += 4) {
        const float4 k = *reinterpret_cast<const float4*>(Kt + lane * LDS + d);
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
          const float4 q = *reinterpret_cast<const float4*>(Qs + (warp * RPW + r) * LDS + d);
          sc[r] += q.x * k.x + q.y * k.y + q.z * k.z + q.w * k.w;
        }
      }
      const int key = t * BN + lane;
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const float x = key < lim[r] ? sc[r] * p.scale_log2 : -INFINITY;
        const float mx = fmaxf(m[r], warp_max(x));
        const float base = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(m[r] - base);
        sc[r] = exp2f(x - base);
        l[r] = l[r] * alpha + warp_sum(sc[r]);
        m[r] = mx;
#pragma unroll
        for (int c = 0; c < DC; ++c) o[r][c] *= alpha;
      }
      for (int j = 0; j < BN; ++j) {
        float vj[DC];
#pragma unroll
        for (int c = 0; c < DC; ++c) vj[c] = lane + 32 * c < D ? Vt[j * LDS + lane + 32 * c] : 0.f;
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
          const float pj = __shfl_sync(0xffffffffu, sc[r], j);
#pragma unroll
          for (int c = 0; c < DC; ++c) o[r][c] += pj * vj[c];
        }
      }
    };
    stream_kv_tiles<PAGED, float, BN, LDS, NT, DMAX>(p, s, v, kvh, keys_for_block<BM>(v, q0), D,
                                                     Ks, Vs, koff, voff, consume);
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int qi = q0 + warp * RPW + r;
      if (qi >= v.q_len) continue;
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      float* dst = p.out + ((v.q_start + qi) * p.num_heads + h) * D;
#pragma unroll
      for (int c = 0; c < DC; ++c)
        if (lane + 32 * c < D) dst[lane + 32 * c] = o[r][c] * inv;
    }
    __syncthreads();
  }
}

// ---- launch ------------------------------------------------------------

// Query rows per block of the kernel that serves T (sizes grid.y).
template <typename T>
constexpr int attention_rows_per_block() {
  return std::is_same_v<T, float> ? kSimtRows : kMmaRows;
}

template <typename Kernel, typename T>
void launch_with_smem(Kernel kernel, size_t smem, dim3 grid, dim3 block,
                      const AttentionParams<T>& p, cudaStream_t stream) {
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(smem));
  kernel<<<grid, block, smem, stream>>>(p);
}

template <typename T, bool PAGED, int DMAX>
void launch_attention_dmax(const AttentionParams<T>& p, dim3 grid, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    launch_with_smem(attention_simt_kernel<PAGED, DMAX>, simt_smem_bytes<DMAX>(), grid,
                     dim3(kSimtThreads), p, stream);
  } else {
    launch_with_smem(attention_mma_kernel<T, PAGED, DMAX>, mma_smem_bytes<T, DMAX>(), grid,
                     dim3(kMmaThreads), p, stream);
  }
}

// head_dim must be a multiple of 8 in [8, 256]; max_seqlen_q sizes the grid
// (queries past it are not computed). Grid y must stay <= 65535: callers
// check ceil(max_seqlen_q / attention_rows_per_block<T>()).
template <typename T, bool PAGED>
void launch_attention(const AttentionParams<T>& p, int64_t max_seqlen_q, cudaStream_t stream) {
  if (p.num_seqs == 0 || p.total_q == 0 || max_seqlen_q == 0 || p.num_heads == 0) return;
  constexpr int BM = attention_rows_per_block<T>();
  const dim3 grid(static_cast<unsigned>(p.num_heads),
                  static_cast<unsigned>((max_seqlen_q + BM - 1) / BM),
                  static_cast<unsigned>(std::min<int64_t>(p.num_seqs, 65535)));
  if (p.head_dim <= 64) {
    launch_attention_dmax<T, PAGED, 64>(p, grid, stream);
  } else if (p.head_dim <= 96) {
    // The vision towers' 80 (Qwen2-VL) and 72 (SigLIP): a 96-wide tile
    // holds fewer accumulators than the 128 one (occupancy).
    launch_attention_dmax<T, PAGED, 96>(p, grid, stream);
  } else if (p.head_dim <= 128) {
    launch_attention_dmax<T, PAGED, 128>(p, grid, stream);
  } else {
    launch_attention_dmax<T, PAGED, 256>(p, grid, stream);
  }
}

}  // namespace cuda
}  // namespace pyvlm
