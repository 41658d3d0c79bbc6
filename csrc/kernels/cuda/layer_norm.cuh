// CUDA LayerNorm kernels (plain and with a fused residual add): one block per
// row, 16-byte vectors where the rows and parameters allow, float32 two-pass
// statistics. Framework-free: plain pointers, sizes and a stream.
//
// A row of up to kLnMaxCachedPacks packs per thread (32768 16-bit or 16384
// float32 elements) is held in registers between the passes (Qwen2-VL's
// 1280-wide bf16 rows: one 16-byte pack per thread), so it is read once and
// written once; wider rows re-read it from L1/L2 between the passes.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../layer_norm.h"
#include "common.cuh"
#include "layers.cuh"

namespace pyvlm {
namespace cuda {

// Helper names carry an ln_ prefix: the .cu adapters may be compiled as one
// unity translation unit with other groups' kernels.

constexpr int kLnMaxThreads = 1024;
constexpr int kLnMaxCachedPacks = 4;

template <typename T, int N>
__device__ __forceinline__ float ln_pack_sum(const LayerPack<T, N>& x) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < N; ++k) s += to_float(x.v[k]);
  return s;
}

template <typename T, int N>
__device__ __forceinline__ float ln_pack_centered_squares(const LayerPack<T, N>& x, float mean) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float d = to_float(x.v[k]) - mean;
    s += d * d;
  }
  return s;
}

// round(x + r), as torch's add in the dtype.
template <typename T, int N>
__device__ __forceinline__ LayerPack<T, N> ln_add_pack(const LayerPack<T, N>& x,
                                                       const LayerPack<T, N>& r) {
  LayerPack<T, N> z;
#pragma unroll
  for (int k = 0; k < N; ++k) z.v[k] = from_float<T>(to_float(x.v[k]) + to_float(r.v[k]));
  return z;
}

// round((x - mean) * rstd * w + b); bias may be null (then no add, so a
// -0 stays -0 as torch's bias-free LayerNorm).
template <typename T, int N>
__device__ __forceinline__ LayerPack<T, N> ln_normalize_pack(const LayerPack<T, N>& x,
                                                             const LayerPack<T, N>* w,
                                                             const LayerPack<T, N>* b,
                                                             int64_t i, float mean, float rstd) {
  const LayerPack<T, N> wi = w[i];
  LayerPack<T, N> bi;
  if (b != nullptr) bi = b[i];
  LayerPack<T, N> o;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float y = (to_float(x.v[k]) - mean) * rstd * to_float(wi.v[k]);
    o.v[k] = from_float<T>(b != nullptr ? y + to_float(bi.v[k]) : y);
  }
  return o;
}

// Pack i of a row: the input's, or with kAdd round(input + residual), stored
// back into the residual.
template <bool kAdd, typename T, int N>
__device__ __forceinline__ LayerPack<T, N> ln_load_pack(const LayerPack<T, N>* x,
                                                        LayerPack<T, N>* res, int64_t i) {
  if constexpr (kAdd) {
    const LayerPack<T, N> z = ln_add_pack(x[i], res[i]);
    res[i] = z;
    return z;
  } else {
    return x[i];
  }
}

// The pointers one row's work takes, as packs.
template <typename T, int N>
struct LnRow {
  const LayerPack<T, N>* in;
  LayerPack<T, N>* res;  // null without kAdd
  LayerPack<T, N>* out;
};

template <typename T, int N>
__device__ __forceinline__ LnRow<T, N> ln_row(T* out, T* residual, const T* in, int64_t row,
                                              int64_t hidden) {
  using P = LayerPack<T, N>;
  return {reinterpret_cast<const P*>(in + row * hidden),
          residual ? reinterpret_cast<P*>(residual + row * hidden) : nullptr,
          reinterpret_cast<P*>(out + row * hidden)};
}

// The row held in registers: thread t owns packs t, t + blockDim.x, ... (at
// most kPacks). The launch bounds keep a 1024-thread block within the
// register file (64 a thread). `out` may alias `in` (the fused op writes the input): each
// thread reads its packs before writing them.
template <typename T, int N, int kPacks, bool kAdd>
__global__ void __launch_bounds__(kLnMaxThreads) ln_cached_kernel(T* out, T* residual, const T* in, const T* __restrict__ weight,
                                 const T* __restrict__ bias, int64_t num_rows, int64_t hidden,
                                 float inv_hidden, float eps) {
  __shared__ float scratch[32];
  start_after_prerequisite_grid();
  using P = LayerPack<T, N>;
  const int64_t num_packs = hidden / N;
  const P* w = reinterpret_cast<const P*>(weight);
  const P* b = reinterpret_cast<const P*>(bias);
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const LnRow<T, N> r = ln_row<T, N>(out, residual, in, row, hidden);
    P x[kPacks];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t i = threadIdx.x + int64_t(k) * blockDim.x;
      if (i < num_packs) {
        x[k] = ln_load_pack<kAdd>(r.in, r.res, i);
        sum += ln_pack_sum(x[k]);
      }
    }
    const float mean = block_sum(sum, scratch) * inv_hidden;
    float squares = 0.f;
#pragma unroll
    for (int k = 0; k < kPacks; ++k)
      if (threadIdx.x + int64_t(k) * blockDim.x < num_packs)
        squares += ln_pack_centered_squares(x[k], mean);
    const float rstd = rsqrtf(block_sum(squares, scratch) * inv_hidden + eps);
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t i = threadIdx.x + int64_t(k) * blockDim.x;
      if (i < num_packs) r.out[i] = ln_normalize_pack(x[k], w, b, i, mean, rstd);
    }
  }
}

// Rows too wide for registers: the passes re-read the row (the residual with
// kAdd, which each thread wrote itself in the first pass).
template <typename T, int N, bool kAdd>
__global__ void __launch_bounds__(kLnMaxThreads) ln_streamed_kernel(T* out, T* residual, const T* in,
                                   const T* __restrict__ weight, const T* __restrict__ bias,
                                   int64_t num_rows, int64_t hidden, float inv_hidden, float eps) {
  __shared__ float scratch[32];
  start_after_prerequisite_grid();
  using P = LayerPack<T, N>;
  const int64_t num_packs = hidden / N;
  const P* w = reinterpret_cast<const P*>(weight);
  const P* b = reinterpret_cast<const P*>(bias);
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const LnRow<T, N> r = ln_row<T, N>(out, residual, in, row, hidden);
    const P* x = kAdd ? r.res : r.in;
    float sum = 0.f;
    for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x)
      sum += ln_pack_sum(ln_load_pack<kAdd>(r.in, r.res, i));
    const float mean = block_sum(sum, scratch) * inv_hidden;
    float squares = 0.f;
    for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x)
      squares += ln_pack_centered_squares(x[i], mean);
    const float rstd = rsqrtf(block_sum(squares, scratch) * inv_hidden + eps);
    for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x)
      r.out[i] = ln_normalize_pack(x[i], w, b, i, mean, rstd);
  }
}

// Packs per thread for a row of num_packs: the fewest of 1, 2, 4 that fit
// kLnMaxThreads threads; 0 when even 4 do not (the streamed kernel: 8 packs
// a thread spill registers).
inline int ln_packs_per_thread(int64_t num_packs) {
  for (int k = 1; k <= kLnMaxCachedPacks; k *= 2)
    if (num_packs <= int64_t(k) * kLnMaxThreads) return k;
  return 0;
}

template <typename T, int N, bool kAdd>
void ln_launch_width(T* out, T* residual, const T* in, const T* weight, const T* bias,
                     int64_t num_rows, int64_t hidden, float eps, cudaStream_t stream) {
  const int64_t num_packs = hidden / N;
  const int packs = ln_packs_per_thread(num_packs);
  const dim3 grid(layer_blocks(num_rows));
  const float inv_hidden = 1.f / static_cast<float>(hidden);
  const auto go = [&](auto kernel, int64_t packs_per_thread) {
    const dim3 block(layer_threads((num_packs + packs_per_thread - 1) / packs_per_thread,
                                   kLnMaxThreads));
    launch_programmatic(kernel, grid, block, 0, stream, out, residual, in, weight, bias,
                        num_rows, hidden, inv_hidden, eps);
  };
  switch (packs) {
    case 1: return go(ln_cached_kernel<T, N, 1, kAdd>, 1);
    case 2: return go(ln_cached_kernel<T, N, 2, kAdd>, 2);
    case 4: return go(ln_cached_kernel<T, N, 4, kAdd>, 4);
    default: return go(ln_streamed_kernel<T, N, kAdd>, kLnMaxCachedPacks);
  }
}

// 16-byte packs when the row width and every pointer allow, else scalars.
template <typename T, bool kAdd>
void ln_launch(T* out, T* residual, const T* in, const T* weight, const T* bias,
               int64_t num_rows, int64_t hidden, float eps, cudaStream_t stream) {
  if (num_rows == 0 || hidden == 0) return;
  constexpr int kWide = 16 / sizeof(T);
  const bool aligned = layer_aligned16(out) && layer_aligned16(in) && layer_aligned16(weight) &&
                       (residual == nullptr || layer_aligned16(residual)) &&
                       (bias == nullptr || layer_aligned16(bias));
  if (hidden % kWide == 0 && aligned) {
    ln_launch_width<T, kWide, kAdd>(out, residual, in, weight, bias, num_rows, hidden, eps,
                                    stream);
  } else {
    ln_launch_width<T, 1, kAdd>(out, residual, in, weight, bias, num_rows, hidden, eps, stream);
  }
}

// out = layer_norm(in) * weight + bias (bias may be null); out may alias in.
template <typename T>
void launch_layer_norm(T* out, const T* in, const T* weight, const T* bias, int64_t num_rows,
                       int64_t hidden, float eps, cudaStream_t stream) {
  ln_launch<T, false>(out, nullptr, in, weight, bias, num_rows, hidden, eps, stream);
}

// residual = round(input + residual); input = layer_norm(residual).
template <typename T>
void launch_fused_add_layer_norm(T* input, T* residual, const T* weight, const T* bias,
                                 int64_t num_rows, int64_t hidden, float eps,
                                 cudaStream_t stream) {
  ln_launch<T, true>(input, residual, input, weight, bias, num_rows, hidden, eps, stream);
}

}  // namespace cuda
}  // namespace pyvlm
