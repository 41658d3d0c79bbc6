// Maps a torch float dtype to the framework-free kernel storage type and
// runs the body with `scalar_t` bound to it.
#pragma once
#include <torch/all.h>

#include "../kernels/dtypes.h"

#define PYVLM_CPU_DISPATCH_FLOAT(dtype, name, ...)                          \
  [&] {                                                                     \
    switch (dtype) {                                                        \
      case at::kFloat: {                                                    \
        using scalar_t = float;                                             \
        return __VA_ARGS__();                                               \
      }                                                                     \
      case at::kHalf: {                                                     \
        using scalar_t = ::pyvlm::half_t;                                   \
        return __VA_ARGS__();                                               \
      }                                                                     \
      case at::kBFloat16: {                                                 \
        using scalar_t = ::pyvlm::bf16_t;                                   \
        return __VA_ARGS__();                                               \
      }                                                                     \
      default:                                                              \
        TORCH_CHECK_VALUE(false, name, ": unsupported dtype ", dtype);      \
    }                                                                       \
  }()

namespace pyvlm {
// Pointer to a tensor's data as the kernel storage type.
template <typename T>
inline T* data_as(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}
}  // namespace pyvlm
