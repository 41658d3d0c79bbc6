// CUDA linear layer for a few tokens: out[t, n] = sum_k in[t, k] * weight[n, k]
// (+ bias[n]), float32 accumulation, one rounding to Out.
// Framework-free: plain pointers, sizes and a stream.
//
// A decode step is bound by reading each weight matrix once. cuBLAS serves
// one to eight token rows with split-K GEMV/GEMM kernels plus a separate
// reduction kernel; here one CTA owns kRows output features over the whole
// K: its threads stream 16-byte weight vectors (two per row in flight,
// bypassing L1), read the tokens' inputs through L1 (every CTA reads the
// same few rows), and reduce across warps in shared memory. No second
// kernel, no workspace, and the bias and a float32 output (the lm_head's
// logits) are folded in.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace pyvlm {
namespace cuda {

constexpr int kSkinnyThreads = 256;
constexpr int kSkinnyRows = 4;       // output features per CTA
constexpr int kSkinnyMaxTokens = 8;  // token rows per launch

// 16 bytes of T as floats (kVec), or a single element.
template <typename T, bool kVec>
struct SkinnyChunk {
  static constexpr int kElems = kVec ? 16 / int(sizeof(T)) : 1;
  using Raw = std::conditional_t<kVec, uint4, T>;

  // Weights are read once per step: keep them out of L1.
  static __device__ __forceinline__ Raw load_streaming(const T* p) {
    if constexpr (kVec) {
      uint4 v;
      asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
          : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
          : "l"(p));
      return v;
    } else {
      return __ldg(p);
    }
  }

  static __device__ __forceinline__ Raw load_cached(const T* p) {
    if constexpr (kVec) {
      return __ldg(reinterpret_cast<const uint4*>(p));
    } else {
      return __ldg(p);
    }
  }

  static __device__ __forceinline__ void unpack(const Raw& raw, float (&f)[kElems]) {
    if constexpr (!kVec) {
      f[0] = to_float(raw);
    } else {
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (std::is_same_v<T, float>) {
          f[i] = __uint_as_float(w[i]);
        } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
          // bfloat16 is float32's upper half.
          f[2 * i] = __uint_as_float(w[i] << 16);
          f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        } else {
          __half2 h;
          memcpy(&h, &w[i], 4);
          const float2 p = __half22float2(h);
          f[2 * i] = p.x;
          f[2 * i + 1] = p.y;
        }
      }
    }
  }
};

// acc[r][m] += weight row r . input row m over U chunks, chunk u at
// element (c + u * kSkinnyThreads) * kElems. Token rows past num_tokens read
// the last real row (their sums are never stored).
template <typename T, int M, bool kVec, int U>
__device__ __forceinline__ void skinny_accumulate(float (&acc)[kSkinnyRows][M],
                                                  const T* const (&rows)[kSkinnyRows],
                                                  const T* in, int64_t in_stride,
                                                  int num_tokens, int64_t c) {
  using Chunk = SkinnyChunk<T, kVec>;
  constexpr int E = Chunk::kElems;
  typename Chunk::Raw w[U][kSkinnyRows];
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int r = 0; r < kSkinnyRows; ++r)
      w[u][r] = Chunk::load_streaming(rows[r] + (c + u * kSkinnyThreads) * E);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float wf[kSkinnyRows][E];
#pragma unroll
    for (int r = 0; r < kSkinnyRows; ++r) Chunk::unpack(w[u][r], wf[r]);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const int64_t token = m < num_tokens ? m : num_tokens - 1;
      float xf[E];
      Chunk::unpack(Chunk::load_cached(in + token * in_stride + (c + u * kSkinnyThreads) * E),
                    xf);
#pragma unroll
      for (int r = 0; r < kSkinnyRows; ++r)
#pragma unroll
        for (int e = 0; e < E; ++e) acc[r][m] = fmaf(wf[r][e], xf[e], acc[r][m]);
    }
  }
}

// One CTA: output features [blockIdx.x * kSkinnyRows, + kSkinnyRows) for
// num_tokens <= M token rows. Launched as a programmatic dependent: the
// weights never depend on the kernel ahead (a norm, an activation, the
// attention), so the CTA's first pass over its rows is prefetched into L2
// before waiting for that kernel, and the GEMM's ramp overlaps it and the
// launch; the inputs are read after the wait.
template <typename T, typename Out, int M, bool kVec>
__global__ void __launch_bounds__(kSkinnyThreads)
    skinny_gemm_kernel(Out* __restrict__ out, const T* __restrict__ in,
                       const T* __restrict__ weight, const T* __restrict__ bias,
                       int num_tokens, int64_t in_features, int64_t in_stride,
                       int64_t out_features) {
  constexpr int E = SkinnyChunk<T, kVec>::kElems;
  const int64_t row0 = int64_t(blockIdx.x) * kSkinnyRows;
  const T* rows[kSkinnyRows];
#pragma unroll
  for (int r = 0; r < kSkinnyRows; ++r)  // past the last feature: re-read it, store nothing
    rows[r] = weight + std::min<int64_t>(row0 + r, out_features - 1) * in_features;

  if (kVec && threadIdx.x < kSkinnyRows) {  // a vector path's rows are 16-byte aligned
    const int64_t first_pass = std::min<int64_t>(in_features, 2 * kSkinnyThreads * E);
    prefetch_l2(weight + std::min<int64_t>(row0 + threadIdx.x, out_features - 1) * in_features,
                static_cast<uint32_t>(first_pass * sizeof(T)));
  }
  allow_dependent_launch();
  wait_for_prerequisite_grid();

  float acc[kSkinnyRows][M] = {};
  const int64_t chunks = in_features / E;
  int64_t c = threadIdx.x;
  for (; c + kSkinnyThreads < chunks; c += 2 * kSkinnyThreads)
    skinny_accumulate<T, M, kVec, 2>(acc, rows, in, in_stride, num_tokens, c);
  if (c < chunks) skinny_accumulate<T, M, kVec, 1>(acc, rows, in, in_stride, num_tokens, c);

  __shared__ float partial[kSkinnyThreads / 32][kSkinnyRows * M];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < kSkinnyRows; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float v = warp_sum(acc[r][m]);
      if (lane == 0) partial[warp][r * M + m] = v;
    }
  __syncthreads();
  if (threadIdx.x >= kSkinnyRows * M) return;
  const int r = threadIdx.x / M, m = threadIdx.x % M;
  const int64_t n = row0 + r;
  if (n >= out_features || m >= num_tokens) return;
  float sum = 0.f;
#pragma unroll
  for (int w = 0; w < kSkinnyThreads / 32; ++w) sum += partial[w][threadIdx.x];
  if (bias != nullptr) sum += to_float(bias[n]);
  out[m * out_features + n] = from_float<Out>(sum);
}

template <typename T, typename Out, int M, bool kVec>
void launch_skinny_gemm_as(Out* out, const T* in, const T* weight, const T* bias,
                           int num_tokens, int64_t in_features, int64_t in_stride,
                           int64_t out_features, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>((out_features + kSkinnyRows - 1) / kSkinnyRows);
  launch_programmatic(skinny_gemm_kernel<T, Out, M, kVec>, dim3(blocks), dim3(kSkinnyThreads), 0,
                      stream, out, in, weight, bias, num_tokens, in_features, in_stride,
                      out_features);
}

// Whether 16-byte vectors cover every row: K and the input's row stride in
// whole vectors, and 16-byte aligned bases.
template <typename T>
bool skinny_gemm_vectorizes(const T* in, const T* weight, int64_t in_features,
                            int64_t in_stride) {
  constexpr int64_t kElems = 16 / sizeof(T);
  return in_features % kElems == 0 && in_stride % kElems == 0 &&
         reinterpret_cast<uintptr_t>(in) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(weight) % 16 == 0;
}

// Up to kSkinnyMaxTokens token rows (the caller splits more); the vector
// path rounds the token count up to 1, 2, 4 or 8.
template <typename T, typename Out>
void launch_skinny_gemm_chunk(Out* out, const T* in, const T* weight, const T* bias,
                              int num_tokens, int64_t in_features, int64_t in_stride,
                              int64_t out_features, cudaStream_t stream) {
  if (!skinny_gemm_vectorizes(in, weight, in_features, in_stride)) {
    return launch_skinny_gemm_as<T, Out, kSkinnyMaxTokens, false>(
        out, in, weight, bias, num_tokens, in_features, in_stride, out_features, stream);
  }
#define PYVLM_SKINNY_CASE(M)                                                            \
  if (num_tokens <= M)                                                                  \
    return launch_skinny_gemm_as<T, Out, M, true>(out, in, weight, bias, num_tokens,    \
                                                  in_features, in_stride, out_features, \
                                                  stream);
  PYVLM_SKINNY_CASE(1)
  PYVLM_SKINNY_CASE(2)
  PYVLM_SKINNY_CASE(4)
  PYVLM_SKINNY_CASE(8)
#undef PYVLM_SKINNY_CASE
}

// out [num_tokens, out_features] (contiguous) = in [num_tokens, in_features]
// (row stride in_stride) x weight^T [out_features, in_features] (+ bias).
template <typename T, typename Out>
void launch_skinny_gemm(Out* out, const T* in, const T* weight, const T* bias,
                        int64_t num_tokens, int64_t in_features, int64_t in_stride,
                        int64_t out_features, cudaStream_t stream) {
  if (out_features == 0) return;
  for (int64_t t0 = 0; t0 < num_tokens; t0 += kSkinnyMaxTokens) {
    const int n = static_cast<int>(std::min<int64_t>(kSkinnyMaxTokens, num_tokens - t0));
    launch_skinny_gemm_chunk<T, Out>(out + t0 * out_features, in + t0 * in_stride, weight,
                                     bias, n, in_features, in_stride, out_features, stream);
  }
}

}  // namespace cuda
}  // namespace pyvlm
