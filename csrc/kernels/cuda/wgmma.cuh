// Hopper warpgroup MMA (wgmma, sm_90a) for 16-bit inputs: shared-memory
// matrix descriptors for the layout the tiles use, the instruction
// wrappers and the fences around them. Framework-free.
//
// Tiles in shared memory use wgmma's no-swizzle ("interleaved") canonical
// layout: a tile of R rows x DK columns (DK a multiple of 16, rows of
// 16-bit values) is stored as 8-row x 8-column core matrices of 128
// contiguous bytes, core matrix (row / 8, column / 8) at byte
// ((row / 8) * DK / 8 + column / 8) * 128, each of its rows 16 bytes
// (attention_sm90.cuh's load_tile fills it in that order). In PTX's
// canonical terms, with T = 8 elements:
//   read K-major (as A, or as B not transposed; K = the columns):
//     ((8,m),(T,2k)):((1T,SBO),(1,LBO)), LBO = 128 B, SBO = DK / 8 * 128 B;
//   read MN-major (B transposed; K = the rows, N = the columns):
//     ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)), SBO = 128 B, LBO = DK / 8 * 128 B.
// So one layout serves Q and K (scores = Q K^T, both K-major over the head
// dimension) and V (out += P V, V read N-major), and a 16-byte chunk of a
// global row lands whole in one core-matrix row (cp.async, zero-fill).
//
// Register fragments (per warp w of the warpgroup, lane l, q = l % 4):
//   accumulator of m64nN: d[4i + e] is row 16w + l/4 + 8 * (e / 2),
//     column 8i + 2q + e % 2;
//   A operand of m64nNk16 (4 x 32-bit, two 16-bit values each): a[j] holds
//     row 16w + l/4 + 8 * (j % 2), columns 8 * (j / 2) + 2q + {0, 1};
// so the accumulator's values 8kk..8kk+7, packed in pairs, are the A
// operand of the k-step kk over its columns (FlashAttention's reuse of the
// scores as P).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common.cuh"

namespace pyvlm {
namespace cuda {
namespace wgmma {

// A shared-memory matrix descriptor: start address, leading and stride
// byte offsets, no swizzle.
__device__ __forceinline__ uint64_t descriptor(uint32_t smem_address, uint32_t leading_bytes,
                                               uint32_t stride_bytes) {
  return uint64_t((smem_address & 0x3FFFF) >> 4) | (uint64_t(leading_bytes >> 4) << 16) |
         (uint64_t(stride_bytes >> 4) << 32);
}

// Descriptor of the k-step kk (columns 16kk ..) of a tile read K-major,
// from its 8-row group `row_group` on.
template <int kChunks>
__device__ __forceinline__ uint64_t k_major(uint32_t tile, int row_group, int kk) {
  return descriptor(tile + (row_group * kChunks + 2 * kk) * 128, 128, kChunks * 128);
}

// Descriptor of the k-step kk (rows 16kk ..) of a tile read N-major (its
// columns are N).
template <int kChunks>
__device__ __forceinline__ uint64_t n_major(uint32_t tile, int kk) {
  return descriptor(tile + 2 * kk * kChunks * 128, kChunks * 128, 128);
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// d (m64 x N, fp32) = A (m64 x k16, shared, K-major) . B (N x k16, shared,
// K-major)^T, + d when accumulate != 0. N = 2 * the array's length.
template <int N, typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b,
                                         int accumulate);

// d = A . B^T as wgmma_ss, without reading d (the first k-step: the
// registers' old values are dead to the compiler).
template <int N, typename T>
__device__ __forceinline__ void wgmma_ss_set(float (&d)[N / 2], uint64_t a, uint64_t b);

// d (m64 x N, fp32) += or = A (registers) . B (k16 x N, shared, N-major).
template <int N, typename T>
__device__ __forceinline__ void wgmma_rs_bt(float (&d)[N / 2], const uint32_t (&a)[4],
                                            uint64_t b, int accumulate);

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PYVLM_WGMMA 1
#include "wgmma_instructions.cuh"

// Before the first wgmma that reads registers written since the last one.
__device__ __forceinline__ void fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N committed groups are pending.
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's generic-proxy shared-memory writes (stores,
// cp.async once waited for) visible to wgmma's reads (the async proxy).
__device__ __forceinline__ void fence_shared_for_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
#else
#define PYVLM_WGMMA 0
#endif

// Keeps the compiler from moving reads or writes of accumulator registers
// across a wgmma fence, commit or wait: the asm statements order among
// themselves, and this ties the registers to them.
template <int M>
__device__ __forceinline__ void pin(float (&d)[M]) {
#pragma unroll
  for (int i = 0; i < M; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The A operand of k-step kk from an m64nN accumulator (see the header).
template <typename T, int M>
__device__ __forceinline__ void accumulator_as_a(const float (&d)[M], int kk, uint32_t (&a)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) a[j] = pack2<T>(d[8 * kk + 2 * j], d[8 * kk + 2 * j + 1]);
}

}  // namespace wgmma
}  // namespace cuda
}  // namespace pyvlm
