// Maps a torch float dtype to the CUDA storage type (float, __half,
// __nv_bfloat16) and runs the body with `scalar_t` bound to it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/all.h>

#define PYVLM_CUDA_DISPATCH_FLOAT(dtype, name, ...)                         \
  [&] {                                                                     \
    switch (dtype) {                                                        \
      case at::kFloat: {                                                    \
        using scalar_t = float;                                             \
        return __VA_ARGS__();                                               \
      }                                                                     \
      case at::kHalf: {                                                     \
        using scalar_t = __half;                                            \
        return __VA_ARGS__();                                               \
      }                                                                     \
      case at::kBFloat16: {                                                 \
        using scalar_t = __nv_bfloat16;                                     \
        return __VA_ARGS__();                                               \
      }                                                                     \
      default:                                                              \
        TORCH_CHECK_VALUE(false, name, ": unsupported dtype ", dtype);      \
    }                                                                       \
  }()

namespace pyvlm {
template <typename T>
inline T* cuda_data_as(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}
}  // namespace pyvlm

// Raises a Python RuntimeError naming the kernel if its launch failed.
#define PYVLM_CHECK_LAUNCH(name)                                            \
  do {                                                                      \
    cudaError_t err__ = cudaGetLastError();                                 \
    TORCH_CHECK(err__ == cudaSuccess, name, " launch failed: ",             \
                cudaGetErrorString(err__));                                 \
  } while (0)
