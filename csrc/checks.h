// Input checks shared by the CPU and CUDA adapters. Every failure raises a
// Python exception (ValueError/RuntimeError through TORCH_CHECK*) that names
// the offending argument; none aborts the process.
#pragma once
#include <torch/all.h>

#include <cstdlib>
#include <string>

namespace pyvlm {

inline void check_device(const at::Tensor& t, const at::Tensor& like,
                         const char* name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ",
                    like.device(), ", got ", t.device());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype,
                        const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must have dtype ", dtype,
                    ", got ", t.scalar_type());
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK_VALUE(
      d == at::kFloat || d == at::kHalf || d == at::kBFloat16, name,
      " must be float32, float16 or bfloat16, got ", d);
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim,
                    " dimensions, got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t size,
                       const char* name) {
  TORCH_CHECK_VALUE(t.size(dim) == size, name, ".size(", dim, ") must be ",
                    size, ", got shape ", t.sizes());
}

// Index tensors (slot ids, page ids, positions) must stay inside [lo, hi).
// CPU adapters always check. CUDA adapters check too, at the price of one
// device-to-host sync per tensor; engines that build their indices
// themselves set PYVLM_CHECK_INDICES=0 to drop the sync on the hot path (the
// CUDA kernels still never write out of bounds: they skip invalid indices).
inline bool index_checks_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("PYVLM_CHECK_INDICES");
    return v == nullptr || std::string(v) != "0";
  }();
  return enabled;
}

inline void check_index_range(const at::Tensor& t, int64_t lo, int64_t hi,
                              const char* name) {
  if (t.numel() == 0) return;
  if (!t.is_cpu() && !index_checks_enabled()) return;
  const auto [mn, mx] = at::aminmax(t);
  const int64_t vmin = mn.item<int64_t>(), vmax = mx.item<int64_t>();
  TORCH_CHECK_INDEX(vmin >= lo && vmax < hi, name, " values must be in [", lo,
                    ", ", hi, "), got min ", vmin, " and max ", vmax);
}

}  // namespace pyvlm
