// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11), framework-free and usable from C++ and CUDA. A counter-based RNG:
// the output is a pure function of (key, counter), so a sampled token depends
// only on the request's seed and step, never on its batch neighbours.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PYVLM_HD __host__ __device__ __forceinline__
#else
#define PYVLM_HD inline
#endif

namespace pyvlm {
namespace philox {

struct Uint4 {
  uint32_t x, y, z, w;
};

PYVLM_HD uint32_t mul_hi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * b) >> 32);
#endif
}

// Ten rounds with the constants of the paper (and of curand/JAX).
PYVLM_HD Uint4 philox4x32_10(Uint4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mul_hi(kMul0, c.x), lo0 = kMul0 * c.x;
    const uint32_t hi1 = mul_hi(kMul1, c.z), lo1 = kMul1 * c.z;
    c = Uint4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return c;
}

// Four random words for block `block` of the stream keyed by (seed, step).
PYVLM_HD Uint4 random_block(int64_t seed, int64_t step, uint32_t block) {
  const uint64_t s = uint64_t(seed), t = uint64_t(step);
  return philox4x32_10(Uint4{block, 0u, uint32_t(t), uint32_t(t >> 32)},
                       uint32_t(s), uint32_t(s >> 32));
}

PYVLM_HD uint32_t lane(const Uint4& r, int i) {
  return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w;
}

// Uniform in the open interval (0, 1) from the top 24 bits (exact in float).
PYVLM_HD float uniform_open(uint32_t bits) {
  return (float(bits >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

}  // namespace philox
}  // namespace pyvlm
