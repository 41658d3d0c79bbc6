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

// QuickGELU (CLIP's and Qwen2-VL's vision MLPs) over elements [begin, end):
// out = x * sigmoid(1.702 x), each step rounded to T as transformers' eager
// QuickGELUActivation rounds it (the scaled input, the sigmoid, the product).
template <typename T>
void quick_gelu(T* out, const T* in, int64_t begin, int64_t end);

}  // namespace pyvlm
