// Input checks shared by the CPU and CUDA adapters. Every failure raises a
// Python exception (ValueError/RuntimeError through TORCH_CHECK*) that names
// the offending argument; none aborts the process.
#pragma once
#include <torch/all.h>

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
// CPU adapters always check (it is cheap). CUDA adapters check only while the
// calling thread's index checks are on: each check costs a device-to-host
// sync, and an engine that builds every index itself turns them off on its
// own thread (the CUDA kernels still never access out of bounds: they skip
// invalid indices). Each thread starts from the process default,
// PYVLM_CHECK_INDICES as read when the extension loads ("0" = off, anything
// else or unset = on). Defined in checks.cpp, which also registers
// torch.ops.pyvlm.set_index_checks and index_checks_enabled.
bool index_checks_enabled();

// Sets the calling thread's setting; returns its previous value.
bool set_index_checks(bool enabled);

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
