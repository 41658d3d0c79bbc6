// Framework-free helpers for the CUDA kernels: float conversion of the
// storage types and warp/block reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

namespace pyvlm {
namespace cuda {

// ---- Programmatic dependent launch (sm_90+) ---------------------------------
// A kernel launched by launch_programmatic may start before the kernel ahead
// of it in the stream has finished: what it does before
// wait_for_prerequisite_grid() must not read or write anything an earlier
// kernel touches (the skinny GEMM loads weights there), and everything after
// sees the earlier kernels' writes. allow_dependent_launch() lets the next
// such kernel be scheduled at once instead of when this grid exits. Both are
// no-ops in a kernel launched without the attribute and before sm_90, so a
// kernel may call them whoever launches it.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_prerequisite_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// The first statement of a kernel that launch_programmatic launches and that
// reads what the kernel ahead wrote: waits for it, then lets the next
// kernel launch (it waits in turn, or, a skinny GEMM, loads its weights).
__device__ __forceinline__ void start_after_prerequisite_grid() {
  wait_for_prerequisite_grid();
  allow_dependent_launch();
}

// Starts bringing `bytes` (a multiple of 16, from a 16-byte aligned address)
// into L2 without waiting or taking registers (sm_90's bulk prefetch; a no-op
// before).
__device__ __forceinline__ void prefetch_l2(const void* address, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(address), "r"(bytes)
               : "memory");
#endif
}

// Whether the current device takes programmatic dependent launches: sm_90
// or newer, unless the environment sets PYVLM_PDL=0 (read once).
inline bool programmatic_launch_enabled() {
  static const bool allowed = [] {
    const char* value = std::getenv("PYVLM_PDL");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices] = {};  // 0 unknown, 1 yes, 2 no
  int device = 0;
  if (!allowed || cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices)
    return false;
  int state = known[device].load(std::memory_order_relaxed);
  if (state == 0) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    state = major >= 9 ? 1 : 2;
    known[device].store(state, std::memory_order_relaxed);
  }
  return state == 1;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic
// dependent of the stream's previous kernel when `programmatic`.
template <typename... Params, typename... Args>
void launch_maybe_programmatic(bool programmatic, void (*kernel)(Params...), dim3 grid,
                               dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute overlap{};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &overlap;
  config.numAttrs = programmatic ? 1 : 0;
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// The same where the device allows it (programmatic_launch_enabled).
template <typename... Params, typename... Args>
void launch_programmatic(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                         cudaStream_t stream, Args&&... args) {
  launch_maybe_programmatic(programmatic_launch_enabled(), kernel, grid, block, smem, stream,
                            std::forward<Args>(args)...);
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats as one 32-bit pair of 16-bit values (lo in the low half), the
// register form of an MMA's A or B operand.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; `scratch` holds at least 32 floats. All threads get
// the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

}  // namespace cuda
}  // namespace pyvlm
