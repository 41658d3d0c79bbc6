// CHECK_CUDA(call) for the standalone kernel sweeps: prints the failing call
// and exits with status 2.
#pragma once
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK_CUDA(call)                                                              \
  do {                                                                                \
    const cudaError_t err = (call);                                                   \
    if (err != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,              \
                   cudaGetErrorString(err));                                          \
      std::exit(2);                                                                   \
    }                                                                                 \
  } while (0)
