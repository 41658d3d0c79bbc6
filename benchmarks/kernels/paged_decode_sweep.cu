// Sweep of the paged decode attention kernel's plans on one GPU, no torch.
//
// For each case (bf16, head_dim 128, shuffled page tables) every variant
// (tensor-core configs x split policies, the SIMT kernel, and the default
// plan that the extension launches) is checked against a plain fp32
// reference kernel and timed with CUDA events: warm-up, then the median of
// kTimedRuns launches, each after a 256 MB read that flushes the L2. A read,
// not a write (cudaMemset, as before 2026-12-08): a write leaves the L2 full
// of dirty lines, which the timed kernel must write back while it reads, up
// to the L2's size more DRAM traffic (50 MB on an H100: +37% on the 134 MB
// of b=1 / ctx 32k), where a decode step's L2 holds mostly the clean
// weights just read. SWEEP_DIRTY_FLUSH=1 flushes with the write. The
// rate is K + V bytes read once over that time, as a share of the device's
// copy bandwidth (cudaMemcpy D2D of 1 GiB, bytes read + written).
//
// Build and run: benchmarks/kernels/run_paged_decode_sweep.sh
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "check_cuda.h"
#include "kernels/cuda/attention.cuh"

namespace {

using bf16 = __nv_bfloat16;
using Args = pyvlm::PagedDecodeArgs<bf16>;
namespace pc = pyvlm::cuda;

constexpr int kHeadDim = 128;
constexpr int kWarmupRuns = 3;
constexpr int kTimedRuns = 30;
constexpr size_t kFlushBytes = size_t(256) << 20;  // several times the L2 of an H100/H200
constexpr size_t kCopyBytes = size_t(1) << 30;
constexpr float kMaxAbsError = 2e-2f;  // bf16 output and bf16 probabilities against fp32

struct Case {
  std::string name;
  std::vector<int> seq_lens;
  int num_heads, num_kv_heads, page_size;
};

std::vector<Case> sweep_cases() {
  const auto uniform = [](int n, int len) { return std::vector<int>(n, len); };
  return {
      {"b=64 ctx=4096 h=32/8", uniform(64, 4096), 32, 8, 16},
      {"b=1 ctx=32768 h=32/8", uniform(1, 32768), 32, 8, 16},
      {"b=64 ctx=3072 h=28/4", uniform(64, 3072), 28, 4, 16},
      {"b=1 ctx=4096 h=28/4", uniform(1, 4096), 28, 4, 16},
      {"b=256 ctx=1024 h=28/4", uniform(256, 1024), 28, 4, 16},
      // Correctness of the masking and of empty splits: lengths that end
      // mid-chunk, zero, and a page size that is not a power of two.
      {"b=8 ragged h=28/4 page=48", {0, 1, 15, 17, 1000, 4095, 9001, 20000}, 28, 4, 48},
  };
}

// ---- Device buffers and inputs --------------------------------------------

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceBuffer(size_t n) : count(n) { CHECK_CUDA(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T))); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// Uniform values in [-amplitude, amplitude) from a counter hash, so a
// gigabyte of cache fills in one pass on the device.
__global__ void fill_uniform_kernel(bf16* p, size_t n, uint32_t seed, float amplitude) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9E3779B9u ^ static_cast<uint32_t>(i >> 32) ^ seed;
    h ^= h >> 16, h *= 0x85EBCA6Bu, h ^= h >> 13, h *= 0xC2B2AE35u, h ^= h >> 16;
    p[i] = __float2bfloat16((h * (1.f / 4294967296.f) * 2.f - 1.f) * amplitude);
  }
}

void fill_uniform(DeviceBuffer<bf16>& b, uint32_t seed, float amplitude) {
  fill_uniform_kernel<<<1024, 256>>>(b.ptr, b.count, seed, amplitude);
  CHECK_CUDA(cudaGetLastError());
}

// Inputs of one case: a cache holding exactly the pages the sequences use,
// handed out in a shuffled order.
struct CaseInputs {
  int num_pages, max_pages;
  DeviceBuffer<bf16> key_cache, value_cache, query, out;
  DeviceBuffer<int32_t> block_tables, seq_lens;

  CaseInputs(const Case& c, int num_pages_, int max_pages_)
      : num_pages(num_pages_),
        max_pages(max_pages_),
        key_cache(size_t(num_pages_) * c.page_size * c.num_kv_heads * kHeadDim),
        value_cache(key_cache.count),
        query(c.seq_lens.size() * c.num_heads * kHeadDim),
        out(query.count),
        block_tables(c.seq_lens.size() * max_pages_),
        seq_lens(c.seq_lens.size()) {}

  Args args(const Case& c) const {
    const int64_t num_seqs = static_cast<int64_t>(c.seq_lens.size());
    return Args{out.ptr, query.ptr, key_cache.ptr, value_cache.ptr, block_tables.ptr,
                seq_lens.ptr, int64_t(c.num_heads) * kHeadDim, kHeadDim, max_pages, num_seqs,
                c.num_heads, c.num_kv_heads, kHeadDim, num_pages, c.page_size, max_pages,
                1.f / std::sqrt(float(kHeadDim))};
  }
};

int pages_for(int len, int page_size) { return (len + page_size - 1) / page_size; }

std::unique_ptr<CaseInputs> make_inputs(const Case& c) {
  int num_pages = 0, max_pages = 1;
  for (int len : c.seq_lens) {
    num_pages += pages_for(len, c.page_size);
    max_pages = std::max(max_pages, pages_for(len, c.page_size));
  }
  num_pages = std::max(num_pages, 1);
  auto in = std::make_unique<CaseInputs>(c, num_pages, max_pages);
  std::vector<int32_t> perm(num_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(12345));
  // Entries past a sequence's pages point at a page that does not exist:
  // the kernel must never read them.
  std::vector<int32_t> table(in->block_tables.count, 1 << 30);
  size_t next = 0;
  for (size_t s = 0; s < c.seq_lens.size(); ++s)
    for (int i = 0; i < pages_for(c.seq_lens[s], c.page_size); ++i)
      table[s * max_pages + i] = perm[next++];
  CHECK_CUDA(cudaMemcpy(in->block_tables.ptr, table.data(), table.size() * sizeof(int32_t),
                        cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(in->seq_lens.ptr, c.seq_lens.data(), c.seq_lens.size() * sizeof(int32_t),
                        cudaMemcpyHostToDevice));
  fill_uniform(in->key_cache, 1, 1.f);
  fill_uniform(in->value_cache, 2, 1.f);
  fill_uniform(in->query, 3, 2.f);  // peakier softmax than unit queries
  return in;
}

// ---- Reference ------------------------------------------------------------

// One block per (sequence, head), everything in fp32: scores into
// `scratch`, their max, exp and sum, then each thread one output dim.
__global__ void reference_decode_kernel(Args a, float* __restrict__ ref,
                                        float* __restrict__ scratch, int max_context) {
  __shared__ float reduce[32];
  const int64_t seq = blockIdx.x / a.num_heads, head = blockIdx.x % a.num_heads;
  const int64_t kv_head = head / (a.num_heads / a.num_kv_heads);
  const int len = a.seq_lens[seq];
  const bf16* q = a.query + seq * a.query_stride_seq + head * a.query_stride_head;
  float* scores = scratch + int64_t(blockIdx.x) * max_context;
  const auto row = [&](const bf16* cache, int t) {
    const int64_t page = a.block_tables[seq * a.block_table_stride + t / a.page_size];
    const int64_t slot = page * a.page_size + t % a.page_size;
    return cache + (slot * a.num_kv_heads + kv_head) * a.head_dim;
  };
  float m = -INFINITY;
  for (int t = threadIdx.x; t < len; t += blockDim.x) {
    const bf16* k = row(a.key_cache, t);
    float s = 0.f;
    for (int e = 0; e < a.head_dim; ++e) s += __bfloat162float(q[e]) * __bfloat162float(k[e]);
    scores[t] = s * a.scale;
    m = fmaxf(m, scores[t]);
  }
  m = pc::block_max(m, reduce);
  float sum = 0.f;
  for (int t = threadIdx.x; t < len; t += blockDim.x) {
    scores[t] = expf(scores[t] - m);
    sum += scores[t];
  }
  sum = pc::block_sum(sum, reduce);  // its barriers also publish `scores`
  for (int e = threadIdx.x; e < a.head_dim; e += blockDim.x) {
    float o = 0.f;
    for (int t = 0; t < len; ++t) o += scores[t] * __bfloat162float(row(a.value_cache, t)[e]);
    ref[blockIdx.x * a.head_dim + e] = len > 0 ? o / sum : 0.f;
  }
}

std::vector<float> reference_output(const Case& c, const Args& a) {
  const int max_context = std::max(1, *std::max_element(c.seq_lens.begin(), c.seq_lens.end()));
  const size_t rows = c.seq_lens.size() * c.num_heads;
  DeviceBuffer<float> ref(rows * kHeadDim), scratch(rows * max_context);
  reference_decode_kernel<<<static_cast<unsigned>(rows), 128>>>(a, ref.ptr, scratch.ptr,
                                                                 max_context);
  CHECK_CUDA(cudaGetLastError());
  std::vector<float> host(ref.count);
  CHECK_CUDA(cudaMemcpy(host.data(), ref.ptr, host.size() * sizeof(float), cudaMemcpyDeviceToHost));
  return host;
}

// Largest |out - ref|; NaN (an element the kernel never wrote: out starts
// as NaN) counts as infinite.
float max_abs_error(const DeviceBuffer<bf16>& out, const std::vector<float>& ref) {
  std::vector<bf16> host(out.count);
  CHECK_CUDA(cudaMemcpy(host.data(), out.ptr, host.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
  float worst = 0.f;
  for (size_t i = 0; i < host.size(); ++i) {
    const float err = std::fabs(__bfloat162float(host[i]) - ref[i]);
    worst = std::isnan(err) ? INFINITY : std::max(worst, err);
  }
  return worst;
}

// ---- Variants -------------------------------------------------------------

using PlanFn = std::function<pc::DecodePlan(const Args&, const pc::DecodeDevice&)>;
using LaunchFn =
    std::function<void(const Args&, const pc::DecodePlan&, float*, float*, cudaStream_t)>;

struct Variant {
  std::string name;
  PlanFn plan;
  LaunchFn launch;
};

template <class Cfg>
Variant mma_variant(const pc::DecodeSplitPolicy& policy, const std::string& policy_name) {
  char name[96];
  std::snprintf(name, sizeof(name), "mma w%d s%d c%d %s", Cfg::kWarps, Cfg::kStages,
                Cfg::kChunkTokens, policy_name.c_str());
  return {name,
          [policy](const Args& a, const pc::DecodeDevice& dev) {
            return pc::plan_paged_decode_mma<bf16, Cfg>(a, dev, policy);
          },
          pc::launch_paged_decode_mma<bf16, Cfg>};
}

template <class... Cfgs>
void add_configs(std::vector<Variant>& v, const pc::DecodeSplitPolicy& policy,
                 const std::string& policy_name) {
  (v.push_back(mma_variant<Cfgs>(policy, policy_name)), ...);
}

std::vector<Variant> sweep_variants() {
  using pc::MmaDecodeConfig;
  const pc::DecodeSplitPolicy base = pc::kDefaultSplitPolicy;
  std::vector<Variant> v;
  v.push_back({"default plan", pc::plan_paged_decode<bf16>, pc::launch_paged_attention_decode<bf16>});
  v.push_back({"simt", pc::plan_paged_decode_simt<bf16>, pc::launch_paged_decode_simt<bf16>});
  // Warps x stages x chunk tokens, from 3 resident CTAs per SM (70 KB) to
  // one (139-204 KB).
  const auto add_all_configs = [&](const pc::DecodeSplitPolicy& policy, const std::string& name) {
    add_configs<MmaDecodeConfig<4, 3, 16>, MmaDecodeConfig<4, 4, 16>, MmaDecodeConfig<4, 2, 16>,
                MmaDecodeConfig<2, 4, 16>, MmaDecodeConfig<8, 2, 16>, MmaDecodeConfig<8, 3, 16>,
                MmaDecodeConfig<2, 3, 32>, MmaDecodeConfig<4, 2, 32>>(v, policy, name);
  };
  add_all_configs(base, "fill1");
  add_all_configs({2.f, base.min_chunks_per_warp, true}, "fill2");
  using Default = pc::DefaultMmaDecodeConfig;
  v.push_back(mma_variant<Default>({0.5f, base.min_chunks_per_warp, true}, "fill0.5"));
  // Splits even batch 64 into more, shorter CTAs (smaller last wave).
  v.push_back(mma_variant<Default>({4.f, base.min_chunks_per_warp, true}, "fill4"));
  v.push_back(mma_variant<Default>({base.fill, 8, true}, "fill1 min8chunks"));
  v.push_back(mma_variant<Default>({base.fill, base.min_chunks_per_warp, false}, "fill1 plain-merge-launch"));
  return v;
}

// ---- Timing ---------------------------------------------------------------

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Device-to-device copy rate in bytes per second, bytes read plus written.
double copy_bandwidth() {
  DeviceBuffer<char> src(kCopyBytes), dst(kCopyBytes);
  CHECK_CUDA(cudaMemset(src.ptr, 1, kCopyBytes));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    CHECK_CUDA(cudaEventRecord(start));
    CHECK_CUDA(cudaMemcpyAsync(dst.ptr, src.ptr, kCopyBytes, cudaMemcpyDeviceToDevice));
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float t;
    CHECK_CUDA(cudaEventElapsedTime(&t, start, stop));
    if (i >= 2) ms.push_back(t);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  return 2.0 * kCopyBytes / (median(ms) * 1e-3);
}

// Whether SWEEP_DIRTY_FLUSH=1 asks for the write flush of the earlier tables.
bool dirty_flush_requested() {
  const char* value = std::getenv("SWEEP_DIRTY_FLUSH");
  return value != nullptr && std::string(value) == "1";
}

// Reads n 16-byte words: the L2 ends up holding clean lines of them. The
// sink is written only for one unlikely value, which keeps the loads.
__global__ void read_flush_kernel(const uint4* p, size_t n, unsigned* sink) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}

// Times launches on one non-blocking stream (programmatic dependent launch
// is for created streams).
struct Timer {
  cudaStream_t stream;
  DeviceBuffer<char> flush{kFlushBytes};
  DeviceBuffer<unsigned> sink{1};
  const bool dirty_flush = dirty_flush_requested();
  std::vector<cudaEvent_t> starts, stops;

  Timer() : starts(kTimedRuns), stops(kTimedRuns) {
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CHECK_CUDA(cudaMemset(flush.ptr, 0x5a, kFlushBytes));
    for (int i = 0; i < kTimedRuns; ++i) {
      CHECK_CUDA(cudaEventCreate(&starts[i]));
      CHECK_CUDA(cudaEventCreate(&stops[i]));
    }
  }
  ~Timer() {
    for (int i = 0; i < kTimedRuns; ++i) cudaEventDestroy(starts[i]), cudaEventDestroy(stops[i]);
    cudaStreamDestroy(stream);
  }

  // Median microseconds of `launch` (on `stream`), each run from a cold L2.
  float median_us(const std::function<void()>& launch) {
    for (int i = 0; i < kWarmupRuns; ++i) launch();
    for (int i = 0; i < kTimedRuns; ++i) {
      if (dirty_flush) {
        CHECK_CUDA(cudaMemsetAsync(flush.ptr, i & 0xff, kFlushBytes, stream));
      } else {
        read_flush_kernel<<<1024, 256, 0, stream>>>(reinterpret_cast<const uint4*>(flush.ptr),
                                                    kFlushBytes / sizeof(uint4), sink.ptr);
      }
      CHECK_CUDA(cudaEventRecord(starts[i], stream));
      launch();
      CHECK_CUDA(cudaEventRecord(stops[i], stream));
    }
    CHECK_CUDA(cudaDeviceSynchronize());
    CHECK_CUDA(cudaGetLastError());
    std::vector<float> us(kTimedRuns);
    for (int i = 0; i < kTimedRuns; ++i) {
      CHECK_CUDA(cudaEventElapsedTime(&us[i], starts[i], stops[i]));
      us[i] *= 1e3f;
    }
    return median(us);
  }
};

pc::DecodeDevice query_device(int device) {
  pc::DecodeDevice d{};
  CHECK_CUDA(cudaDeviceGetAttribute(&d.num_sms, cudaDevAttrMultiProcessorCount, device));
  CHECK_CUDA(cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  CHECK_CUDA(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device));
  return d;
}

double kv_bytes(const Case& c) {
  double tokens = 0;
  for (int len : c.seq_lens) tokens += len;
  return tokens * c.num_kv_heads * kHeadDim * 2 /* K and V */ * sizeof(bf16);
}

// Runs every variant on one case; returns how many failed the check.
int sweep_case(const Case& c, const std::vector<Variant>& variants, const pc::DecodeDevice& dev,
               double copy_rate, Timer& timer) {
  const auto in = make_inputs(c);
  const Args a = in->args(c);
  const std::vector<float> ref = reference_output(c, a);
  int failures = 0;
  for (const Variant& v : variants) {
    const pc::DecodePlan plan = v.plan(a, dev);
    const size_t rows = c.seq_lens.size() * c.num_heads * size_t(plan.num_splits);
    DeviceBuffer<float> part_out(plan.num_splits > 1 ? rows * kHeadDim : 0);
    DeviceBuffer<float> part_lse(plan.num_splits > 1 ? rows : 0);
    const auto launch = [&] { v.launch(a, plan, part_out.ptr, part_lse.ptr, timer.stream); };
    CHECK_CUDA(cudaMemsetAsync(in->out.ptr, 0xff, in->out.count * sizeof(bf16),  // bf16 NaN
                               timer.stream));
    launch();
    CHECK_CUDA(cudaDeviceSynchronize());
    CHECK_CUDA(cudaGetLastError());
    const float err = max_abs_error(in->out, ref);
    const bool ok = err <= kMaxAbsError;
    failures += !ok;
    const float us = timer.median_us(launch);
    std::printf("| %s | %s | %d | %.1f | %.1f%% | %.2e | %s |\n", c.name.c_str(), v.name.c_str(),
                plan.num_splits, us, 100.0 * kv_bytes(c) / (us * 1e-6) / copy_rate, err,
                ok ? "ok" : "FAIL");
    std::fflush(stdout);
  }
  return failures;
}

}  // namespace

int main() {
  int device = 0;
  CHECK_CUDA(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, device));
  const pc::DecodeDevice dev = query_device(device);
  const double copy_rate = copy_bandwidth();
  std::printf("device: %s, %d SMs, %d MB L2, %d KB shared memory per SM\n", prop.name, dev.num_sms,
              prop.l2CacheSize >> 20, dev.smem_per_sm >> 10);
  std::printf("copy bandwidth (cudaMemcpy D2D of 1 GiB, read + written): %.2f TB/s\n",
              copy_rate * 1e-12);
  std::printf("L2 flushed before each timed run by a 256 MB %s\n\n",
              dirty_flush_requested() ? "write (dirty lines)" : "read (clean lines)");
  std::printf("| case | variant | splits | us | %% of copy bw | max abs err | check |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  const std::vector<Variant> variants = sweep_variants();
  Timer timer;
  int failures = 0;
  for (const Case& c : sweep_cases()) failures += sweep_case(c, variants, dev, copy_rate, timer);
  std::printf("\n%d failed check(s) (max abs error > %.0e or unwritten output)\n", failures,
              kMaxAbsError);
  return failures == 0 ? 0 : 1;
}
