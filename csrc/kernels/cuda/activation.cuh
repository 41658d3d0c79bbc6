// CUDA gated activations: out[t, i] = act(in[t, i]) * in[t, d + i].
// Framework-free: plain pointers, sizes and a stream.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../activation.h"
#include "common.cuh"

namespace pyvlm {
namespace cuda {

template <Activation A>
__device__ __forceinline__ float activate(float x) {
  if constexpr (A == Activation::kSilu) {
    return x / (1.f + __expf(-x));
  } else if constexpr (A == Activation::kGelu) {
    return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  } else {
    // 0.5 x (1 + tanh(u)) == x * sigmoid(2u): exact identity, and it avoids
    // fast-math's tanh.approx (relative error ~1e-3 near zero).
    const float k = 0.79788456080286536f;
    return x / (1.f + __expf(-2.f * k * (x + 0.044715f * x * x * x)));
  }
}

constexpr int kActThreads = 256;

// out[t, i] for one element; V is how many consecutive outputs one thread
// makes (16-byte loads and stores when the rows allow it).
template <typename T, Activation A, int V>
__device__ __forceinline__ void act_and_mul_at(T* __restrict__ y, const T* __restrict__ x,
                                               int64_t d, int64_t i) {
  if constexpr (V == 1) {
    y[i] = from_float<T>(activate<A>(to_float(x[i])) * to_float(x[d + i]));
  } else {
    const uint4 a = *reinterpret_cast<const uint4*>(x + i);
    const uint4 b = *reinterpret_cast<const uint4*>(x + d + i);
    const T* av = reinterpret_cast<const T*>(&a);
    const T* bv = reinterpret_cast<const T*>(&b);
    uint4 r;
    T* rv = reinterpret_cast<T*>(&r);
#pragma unroll
    for (int e = 0; e < V; ++e) rv[e] = from_float<T>(activate<A>(to_float(av[e])) * to_float(bv[e]));
    *reinterpret_cast<uint4*>(y + i) = r;
  }
}

// Grid (tokens, blocks per row): a token's row is spread over several
// blocks, so one decode token still fills many SMs (one block per token
// left a batch-1 step's 18,944-wide row to a single SM: 9.5 us on an H100).
template <typename T, Activation A, int V>
__global__ void act_and_mul_kernel(T* __restrict__ out, const T* __restrict__ in, int64_t d) {
  start_after_prerequisite_grid();
  const int64_t t = blockIdx.x;
  const int64_t i = (int64_t(blockIdx.y) * kActThreads + threadIdx.x) * V;
  if (i < d) act_and_mul_at<T, A, V>(out + t * d, in + t * 2 * d, d, i);
}

template <typename T, Activation A>
void launch_act_and_mul_as(T* out, const T* in, int64_t num_tokens, int64_t d,
                           cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = d % kVec == 0 && reinterpret_cast<uintptr_t>(in) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int64_t per_block = int64_t(kActThreads) * (vec ? kVec : 1);
  const dim3 grid(static_cast<unsigned>(num_tokens),
                  static_cast<unsigned>((d + per_block - 1) / per_block));
  if (vec) {
    launch_programmatic(act_and_mul_kernel<T, A, kVec>, grid, dim3(kActThreads), 0, stream, out,
                        in, d);
  } else {
    launch_programmatic(act_and_mul_kernel<T, A, 1>, grid, dim3(kActThreads), 0, stream, out, in,
                        d);
  }
}

template <typename T>
void launch_act_and_mul(T* out, const T* in, int64_t num_tokens, int64_t d,
                        Activation act, cudaStream_t stream) {
  if (num_tokens == 0 || d == 0) return;
  switch (act) {
    case Activation::kSilu:
      return launch_act_and_mul_as<T, Activation::kSilu>(out, in, num_tokens, d, stream);
    case Activation::kGelu:
      return launch_act_and_mul_as<T, Activation::kGelu>(out, in, num_tokens, d, stream);
    case Activation::kGeluTanh:
      return launch_act_and_mul_as<T, Activation::kGeluTanh>(out, in, num_tokens, d, stream);
  }
}

template <typename T>
__device__ __forceinline__ float rounded_to(float x) {
  return to_float(from_float<T>(x));
}

template <typename T>
__device__ __forceinline__ T quick_gelu_of(T v) {
  const float x = to_float(v);
  const float scaled = rounded_to<T>(1.702f * x);
  const float gate = rounded_to<T>(1.f / (1.f + __expf(-scaled)));
  return from_float<T>(x * gate);
}

// V consecutive elements per thread (16-byte vectors when aligned).
template <typename T, int V>
__global__ void quick_gelu_kernel(T* __restrict__ out, const T* __restrict__ in, int64_t n) {
  const int64_t i = (int64_t(blockIdx.x) * kActThreads + threadIdx.x) * V;
  if (i >= n) return;
  if constexpr (V == 1) {
    out[i] = quick_gelu_of(in[i]);
  } else {
    const uint4 a = *reinterpret_cast<const uint4*>(in + i);
    const T* av = reinterpret_cast<const T*>(&a);
    uint4 r;
    T* rv = reinterpret_cast<T*>(&r);
#pragma unroll
    for (int e = 0; e < V; ++e) rv[e] = quick_gelu_of(av[e]);
    *reinterpret_cast<uint4*>(out + i) = r;
  }
}

// out[i] = QuickGELU(in[i]) for n elements, rounded as transformers' eager op.
template <typename T>
void launch_quick_gelu(T* out, const T* in, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = n % kVec == 0 && reinterpret_cast<uintptr_t>(in) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int64_t per_block = int64_t(kActThreads) * (vec ? kVec : 1);
  const auto blocks = static_cast<unsigned>((n + per_block - 1) / per_block);
  if (vec) {
    quick_gelu_kernel<T, kVec><<<blocks, kActThreads, 0, stream>>>(out, in, n);
  } else {
    quick_gelu_kernel<T, 1><<<blocks, kActThreads, 0, stream>>>(out, in, n);
  }
}

}  // namespace cuda
}  // namespace pyvlm
