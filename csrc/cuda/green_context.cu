// A CUDA stream confined to part of the GPU's SMs: a green context's stream
// (driver API, CUDA 12.5+ drivers), for work that runs beside the other
// streams without taking every SM (pyvlm's --vision-tower-sms). Made here
// rather than through torch.cuda.green_contexts because only some torch
// releases give a green context a stream of its own; the driver always can.
// The driver's entry points are looked up through the runtime, so the
// extension does not link libcuda.
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

namespace pyvlm {
namespace {

#if CUDART_VERSION >= 12050  // the toolkit declares green contexts and the versioned lookup

// The first driver release with every call below (cuGreenCtxStreamCreate).
constexpr unsigned int kDriverVersion = 12050;

template <typename Fn>
Fn driver_entry(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t err =
      cudaGetDriverEntryPointByVersion(name, &fn, kDriverVersion, cudaEnableDefault, &found);
  TORCH_CHECK(err == cudaSuccess && found == cudaDriverEntryPointSuccess && fn != nullptr,
              "green-context streams need a CUDA driver of 12.5 or newer: ", name,
              " is not available (", cudaGetErrorString(err), ")");
  return reinterpret_cast<Fn>(fn);
}

void check_driver(CUresult result, const char* call) {
  TORCH_CHECK(result == CUDA_SUCCESS, call, " failed with CUresult ", static_cast<int>(result));
}

struct GreenStream {
  CUgreenCtx context;
  CUstream stream;
};

// Streams made here are used until the process ends, and a green context
// must outlive its streams: both are kept, never destroyed.
std::mutex kept_mutex;
std::vector<GreenStream> kept;

// [stream handle, SMs granted]: the driver rounds num_sms up to its
// partition granularity (the count of SMs it schedules together).
std::vector<int64_t> green_context_stream(int64_t device, int64_t num_sms, int64_t priority) {
  TORCH_CHECK_VALUE(num_sms > 0, "green_context_stream: num_sms must be positive, got ", num_sms);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  TORCH_CHECK(cudaFree(nullptr) == cudaSuccess, "green_context_stream: CUDA device ", device,
              " could not be initialised");  // the runtime's primary context, made current

  using DeviceGet = CUresult (*)(CUdevice*, int);
  using GetDevResource = CUresult (*)(CUdevice, CUdevResource*, CUdevResourceType);
  using SplitByCount = CUresult (*)(CUdevResource*, unsigned int*, const CUdevResource*,
                                    CUdevResource*, unsigned int, unsigned int);
  using GenerateDesc = CUresult (*)(CUdevResourceDesc*, CUdevResource*, unsigned int);
  using GreenCtxCreate = CUresult (*)(CUgreenCtx*, CUdevResourceDesc, CUdevice, unsigned int);
  using GreenCtxStreamCreate = CUresult (*)(CUstream*, CUgreenCtx, unsigned int, int);

  CUdevice dev;
  check_driver(driver_entry<DeviceGet>("cuDeviceGet")(&dev, static_cast<int>(device)),
               "cuDeviceGet");
  CUdevResource all{};
  check_driver(driver_entry<GetDevResource>("cuDeviceGetDevResource")(
                   dev, &all, CU_DEV_RESOURCE_TYPE_SM),
               "cuDeviceGetDevResource");
  TORCH_CHECK_VALUE(num_sms < static_cast<int64_t>(all.sm.smCount), "green_context_stream: ",
                    num_sms, " SMs asked for, the device has ", all.sm.smCount,
                    ": leave the other streams some");
  CUdevResource group{};
  unsigned int num_groups = 1;
  check_driver(driver_entry<SplitByCount>("cuDevSmResourceSplitByCount")(
                   &group, &num_groups, &all, nullptr, 0, static_cast<unsigned int>(num_sms)),
               "cuDevSmResourceSplitByCount");
  TORCH_CHECK(num_groups == 1, "green_context_stream: the driver could not set ", num_sms,
              " SMs apart");
  CUdevResourceDesc desc;
  check_driver(driver_entry<GenerateDesc>("cuDevResourceGenerateDesc")(&desc, &group, 1),
               "cuDevResourceGenerateDesc");
  GreenStream made{};
  check_driver(driver_entry<GreenCtxCreate>("cuGreenCtxCreate")(&made.context, desc, dev,
                                                                CU_GREEN_CTX_DEFAULT_STREAM),
               "cuGreenCtxCreate");
  check_driver(driver_entry<GreenCtxStreamCreate>("cuGreenCtxStreamCreate")(
                   &made.stream, made.context, CU_STREAM_NON_BLOCKING, static_cast<int>(priority)),
               "cuGreenCtxStreamCreate");
  {
    const std::lock_guard<std::mutex> lock(kept_mutex);
    kept.push_back(made);
  }
  return {reinterpret_cast<int64_t>(made.stream), static_cast<int64_t>(group.sm.smCount)};
}

#else  // an older toolkit: the extension builds, and the op says why it cannot

std::vector<int64_t> green_context_stream(int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "green_context_stream: pyvlm's extension was built with CUDA ", CUDART_VERSION,
              "; green-context streams need a CUDA 12.5+ toolkit");
}

#endif

}  // namespace
}  // namespace pyvlm

// No tensor arguments, so no device to dispatch on: one kernel for all keys
// (a build without CUDA registers csrc/streams.cpp's instead).
TORCH_LIBRARY_IMPL(pyvlm, CompositeExplicitAutograd, m) {
  m.impl("green_context_stream", &pyvlm::green_context_stream);
}
