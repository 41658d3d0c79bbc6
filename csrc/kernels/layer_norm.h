// LayerNorm kernels with torch's nn.LayerNorm maths: mean and biased
// variance over the last dimension, in float32, then (x - mean) * rstd *
// weight + bias rounded once to the dtype. The fused form first adds a
// residual (rounded to the dtype, as torch's add), the statistics being
// those of that rounded sum.
#pragma once
#include <cstdint>

namespace pyvlm {

// Rows [row_begin, row_end) of contiguous [rows, hidden] tensors. `bias` may
// be null (no bias); `out` may alias `in`. Two passes over each row: the
// mean, then the mean of the squared deviations from it.
template <typename T>
void layer_norm(T* out, const T* in, const T* weight, const T* bias, int64_t hidden, float eps,
                int64_t row_begin, int64_t row_end);

// residual = round(input + residual); input = layer_norm(residual) as above.
template <typename T>
void fused_add_layer_norm(T* input, T* residual, const T* weight, const T* bias, int64_t hidden,
                          float eps, int64_t row_begin, int64_t row_end);

}  // namespace pyvlm
