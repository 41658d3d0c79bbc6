// Argument checks for sample and apply_penalties, shared by the CPU and CUDA
// adapters. Value-range checks of the per-row parameters and of the CSR
// offsets need the data on the host: the CPU adapter runs them; on CUDA they
// would cost a device-to-host sync each, so there only token ids are range
// checked (while the thread's index checks are on) and the kernels clamp the rest.
#pragma once
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../kernels/sampling.h"

namespace pyvlm {

inline void check_row_vector(const at::Tensor& t, const at::Tensor& like, int64_t n,
                             at::ScalarType dtype, const char* name) {
  check_device(t, like, name);
  check_dtype(t, dtype, name);
  check_dim(t, 1, name);
  check_size(t, 0, n, name);
  check_contiguous(t, name);
}

// Shapes, dtypes and devices of sample's arguments; returns num_top.
inline int64_t check_sample(const at::Tensor& out_tokens, const at::Tensor& out_logprobs,
                            const at::Tensor& out_top_ids, const at::Tensor& out_top_logprobs,
                            const at::Tensor& logits, const at::Tensor& temperatures,
                            const at::Tensor& top_ks, const at::Tensor& top_ps,
                            const at::Tensor& min_ps, const at::Tensor& seeds,
                            const at::Tensor& steps) {
  check_float_dtype(logits, "logits");
  check_dim(logits, 2, "logits");
  check_contiguous(logits, "logits");
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK_VALUE(vocab > 0 || batch == 0, "logits must have at least one column, got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(vocab < INT32_MAX, "logits.size(1) must be < 2^31, got ", vocab);
  check_row_vector(out_tokens, logits, batch, at::kLong, "out_tokens");
  check_row_vector(out_logprobs, logits, batch, at::kFloat, "out_logprobs");
  check_row_vector(temperatures, logits, batch, at::kFloat, "temperatures");
  check_row_vector(top_ks, logits, batch, at::kInt, "top_ks");
  check_row_vector(top_ps, logits, batch, at::kFloat, "top_ps");
  check_row_vector(min_ps, logits, batch, at::kFloat, "min_ps");
  check_row_vector(seeds, logits, batch, at::kLong, "seeds");
  check_row_vector(steps, logits, batch, at::kLong, "steps");
  for (const auto& [t, name, dtype] :
       {std::tuple{&out_top_ids, "out_top_ids", at::kLong},
        std::tuple{&out_top_logprobs, "out_top_logprobs", at::kFloat}}) {
    check_device(*t, logits, name);
    check_dtype(*t, dtype, name);
    check_dim(*t, 2, name);
    check_size(*t, 0, batch, name);
    check_contiguous(*t, name);
  }
  const int64_t num_top = out_top_ids.size(1);
  check_size(out_top_logprobs, 1, num_top, "out_top_logprobs");
  TORCH_CHECK_VALUE(num_top <= kSampleMaxTop && (num_top <= vocab || batch == 0),
                    "out_top_ids.size(1) (num_top) must be at most ", kSampleMaxTop,
                    " and at most the vocabulary size ", vocab, ", got ", num_top);
  return num_top;
}

// Per-row parameter ranges (CPU tensors only: reads the values).
inline void check_sample_ranges(const at::Tensor& temperatures, const at::Tensor& top_ps,
                                const at::Tensor& min_ps) {
  if (temperatures.numel() == 0) return;
  TORCH_CHECK_VALUE(at::isfinite(temperatures).all().item<bool>(),
                    "temperatures must be finite (<= 0 means greedy)");
  TORCH_CHECK_VALUE(((top_ps > 0) & (top_ps <= 1)).all().item<bool>(),
                    "top_ps values must be in (0, 1] (1 = off)");
  TORCH_CHECK_VALUE(((min_ps >= 0) & (min_ps <= 1)).all().item<bool>(),
                    "min_ps values must be in [0, 1] (0 = off)");
}

// CSR offsets: int32 [batch + 1], starting at 0, non-decreasing, ending at nnz
// (value checks on CPU only).
inline void check_csr(const at::Tensor& cu, const at::Tensor& like, int64_t batch, int64_t nnz,
                      const char* name) {
  check_row_vector(cu, like, batch + 1, at::kInt, name);
  if (!cu.is_cpu()) return;
  const int32_t* c = cu.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(c[0] == 0, name, "[0] must be 0, got ", c[0]);
  for (int64_t r = 0; r < batch; ++r)
    TORCH_CHECK_VALUE(c[r] <= c[r + 1], name, " must be non-decreasing, got ", c[r], " > ",
                      c[r + 1], " at row ", r);
  TORCH_CHECK_VALUE(c[batch] == nnz, name, "[-1] must equal the number of entries ", nnz,
                    ", got ", c[batch]);
}

// Each CSR row lists distinct token ids (CPU only).
inline void check_unique_per_row(const at::Tensor& ids, const at::Tensor& cu, int64_t vocab,
                                 const char* name) {
  if (!ids.is_cpu() || ids.numel() == 0) return;
  const int64_t* id = ids.data_ptr<int64_t>();
  const int32_t* c = cu.data_ptr<int32_t>();
  std::vector<int32_t> last_row(vocab, -1);
  for (int64_t r = 0; r + 1 < cu.numel(); ++r)
    for (int64_t j = c[r]; j < c[r + 1]; ++j) {
      TORCH_CHECK_VALUE(last_row[id[j]] != int32_t(r), name, " must be unique within a row; ",
                        "token ", id[j], " repeats in row ", r);
      last_row[id[j]] = int32_t(r);
    }
}

inline void check_apply_penalties(const at::Tensor& logits, const at::Tensor& token_ids,
                                  const at::Tensor& output_counts,
                                  const at::Tensor& cu_token_rows,
                                  const at::Tensor& presence_penalties,
                                  const at::Tensor& frequency_penalties,
                                  const at::Tensor& repetition_penalties,
                                  const at::Tensor& bias_token_ids,
                                  const at::Tensor& bias_values, const at::Tensor& cu_bias_rows) {
  check_float_dtype(logits, "logits");
  check_dim(logits, 2, "logits");
  check_contiguous(logits, "logits");
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK_VALUE(vocab < INT32_MAX, "logits.size(1) must be < 2^31, got ", vocab);
  check_device(token_ids, logits, "token_ids");
  check_dtype(token_ids, at::kLong, "token_ids");
  check_dim(token_ids, 1, "token_ids");
  check_contiguous(token_ids, "token_ids");
  const int64_t nnz = token_ids.size(0);
  TORCH_CHECK_VALUE(nnz < INT32_MAX, "token_ids must have fewer than 2^31 entries");
  check_row_vector(output_counts, logits, nnz, at::kInt, "output_counts");
  check_row_vector(presence_penalties, logits, batch, at::kFloat, "presence_penalties");
  check_row_vector(frequency_penalties, logits, batch, at::kFloat, "frequency_penalties");
  check_row_vector(repetition_penalties, logits, batch, at::kFloat, "repetition_penalties");
  check_device(bias_token_ids, logits, "bias_token_ids");
  check_dtype(bias_token_ids, at::kLong, "bias_token_ids");
  check_dim(bias_token_ids, 1, "bias_token_ids");
  check_contiguous(bias_token_ids, "bias_token_ids");
  const int64_t nnz_bias = bias_token_ids.size(0);
  TORCH_CHECK_VALUE(nnz_bias < INT32_MAX, "bias_token_ids must have fewer than 2^31 entries");
  check_row_vector(bias_values, logits, nnz_bias, at::kFloat, "bias_values");
  check_csr(cu_token_rows, logits, batch, nnz, "cu_token_rows");
  check_csr(cu_bias_rows, logits, batch, nnz_bias, "cu_bias_rows");
  check_index_range(token_ids, 0, vocab, "token_ids");
  check_index_range(bias_token_ids, 0, vocab, "bias_token_ids");
  if (!logits.is_cpu()) return;
  TORCH_CHECK_VALUE(nnz == 0 || output_counts.min().item<int32_t>() >= 0,
                    "output_counts must be >= 0");
  TORCH_CHECK_VALUE(batch == 0 || (repetition_penalties > 0).all().item<bool>(),
                    "repetition_penalties must be > 0 (1 = off)");
  check_unique_per_row(token_ids, cu_token_rows, vocab, "token_ids");
  check_unique_per_row(bias_token_ids, cu_bias_rows, vocab, "bias_token_ids");
}

}  // namespace pyvlm
