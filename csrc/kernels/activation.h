// Gated activations: out[t, i] = act(in[t, i]) * in[t, d + i].
#pragma once
#include <cstdint>

namespace pyvlm {

enum class Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

// CPU kernel over tokens [token_begin, token_end) of a contiguous
// [num_tokens, 2 * d] input; T is float, half_t or bf16_t.
template <typename T>
void act_and_mul(T* out, const T* in, int64_t d, int64_t token_begin,
                 int64_t token_end, Activation act);

}  // namespace pyvlm
