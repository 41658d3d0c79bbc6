// Linear layers for a few tokens ("skinny" GEMM, GEMV at one token):
// out[t, n] = sum_k in[t, k] * weight[n, k] (+ bias[n]), accumulated in
// float32 and rounded once to the output type.
//
// Decode steps multiply a handful of token rows by every weight matrix, so
// the product is bound by reading the weights once; the CUDA kernel streams
// them with no split-K pass, and the CPU kernel here is the plain reference
// the CUDA one is checked against (and what the C++ library offers).
#pragma once
#include <cstdint>

namespace pyvlm {

// Output features [row_begin, row_end) for every token. in: token t's row
// starts at in + t * in_stride; weight: contiguous [out_features,
// in_features]; bias: [out_features] or nullptr; out: contiguous
// [num_tokens, out_features]. T is float, half_t or bf16_t; Out is T or float.
template <typename T, typename Out>
void skinny_gemm(Out* out, const T* in, const T* weight, const T* bias, int64_t num_tokens,
                 int64_t in_features, int64_t in_stride, int64_t out_features,
                 int64_t row_begin, int64_t row_end);

}  // namespace pyvlm
