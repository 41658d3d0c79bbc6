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

// One block per token; threads stride over the d outputs.
template <typename T, Activation A>
__global__ void act_and_mul_kernel(T* __restrict__ out,
                                   const T* __restrict__ in, int64_t d) {
  const int64_t t = blockIdx.x;
  const T* x = in + t * 2 * d;
  T* y = out + t * d;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
    y[i] = from_float<T>(activate<A>(to_float(x[i])) * to_float(x[d + i]));
}

template <typename T>
void launch_act_and_mul(T* out, const T* in, int64_t num_tokens, int64_t d,
                        Activation act, cudaStream_t stream) {
  if (num_tokens == 0 || d == 0) return;
  const dim3 grid(static_cast<unsigned>(num_tokens));
  const dim3 block(static_cast<unsigned>(d < 1024 ? ((d + 31) / 32) * 32 : 1024));
  switch (act) {
    case Activation::kSilu:
      act_and_mul_kernel<T, Activation::kSilu><<<grid, block, 0, stream>>>(out, in, d);
      break;
    case Activation::kGelu:
      act_and_mul_kernel<T, Activation::kGelu><<<grid, block, 0, stream>>>(out, in, d);
      break;
    case Activation::kGeluTanh:
      act_and_mul_kernel<T, Activation::kGeluTanh><<<grid, block, 0, stream>>>(out, in, d);
      break;
  }
}

}  // namespace cuda
}  // namespace pyvlm
