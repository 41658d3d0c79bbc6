// Argument checks for paged_attention_prefill and varlen_attention, shared by
// the CPU and CUDA adapters. Value checks of the index tensors (cu_seqlens,
// prefix_lens, block tables) run on the tensors' device and come back in one
// transfer: always on CPU, on CUDA while the thread's index checks are on.
#pragma once
#include <limits>
#include <vector>

#include "../checks.h"
#include "../kernels/prefill.h"

namespace pyvlm {

// A [tokens, heads, head_dim] tensor whose last dimension is contiguous (a
// view into a fused projection is fine).
inline void check_token_major(const at::Tensor& t, const char* name) {
  check_dim(t, 3, name);
  TORCH_CHECK_VALUE(t.size(2) <= 1 || t.stride(2) == 1, name,
                    "'s last dimension must be contiguous, got strides ", t.strides());
}

inline void check_index_tensor(const at::Tensor& t, const at::Tensor& like, int64_t size,
                               const char* name) {
  check_dtype(t, at::kInt, name);
  check_device(t, like, name);
  check_dim(t, 1, name);
  check_size(t, 0, size, name);
  check_contiguous(t, name);
}

inline void check_attention_heads(const at::Tensor& query, int64_t num_kv_heads,
                                  int64_t kv_head_dim, const char* kv_name) {
  TORCH_CHECK_VALUE(kv_head_dim == query.size(2), kv_name, " head_dim must equal query's (",
                    query.size(2), "), got ", kv_head_dim);
  TORCH_CHECK_VALUE(num_kv_heads > 0 && query.size(1) % num_kv_heads == 0,
                    "query's num_heads (", query.size(1),
                    ") must be a positive multiple of ", kv_name, "'s num_kv_heads (",
                    num_kv_heads, ")");
}

inline void check_out(const at::Tensor& out, const at::Tensor& query) {
  check_dtype(out, query.scalar_type(), "out");
  check_device(out, query, "out");
  check_contiguous(out, "out");
  TORCH_CHECK_VALUE(out.sizes() == query.sizes(), "out must have shape ", query.sizes(),
                    ", got ", out.sizes());
}

inline bool value_checks_enabled(const at::Tensor& t) {
  return t.is_cpu() || index_checks_enabled();
}

// lens = cu[1:] - cu[:-1] (int64), after checking cu starts at 0 and ends at
// `total`; those two facts and min/max of lens land in `stats`.
inline at::Tensor seqlens_of(const at::Tensor& cu, std::vector<at::Tensor>& stats) {
  const auto cu64 = cu.to(at::kLong);
  stats.push_back(cu64.slice(0, 0, 1));
  stats.push_back(cu64.slice(0, -1));
  return cu64.slice(0, 1) - cu64.slice(0, 0, -1);
}

inline void push_min_max(const at::Tensor& t, int64_t empty_min, int64_t empty_max,
                         std::vector<at::Tensor>& stats) {
  if (t.numel() == 0) {
    stats.push_back(at::full({1}, empty_min, t.options().dtype(at::kLong)));
    stats.push_back(at::full({1}, empty_max, t.options().dtype(at::kLong)));
    return;
  }
  stats.push_back(t.min().to(at::kLong).reshape({1}));
  stats.push_back(t.max().to(at::kLong).reshape({1}));
}

inline std::vector<int64_t> fetch_stats(const std::vector<at::Tensor>& stats) {
  const auto host = at::cat(stats).cpu();
  const int64_t* p = host.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + host.numel());
}

inline void check_cu_seqlens(const std::vector<int64_t>& st, size_t at_, int64_t total,
                             int64_t max_seqlen, const char* name, const char* max_name) {
  TORCH_CHECK_VALUE(st[at_] == 0, name, "[0] must be 0, got ", st[at_]);
  TORCH_CHECK_VALUE(st[at_ + 1] == total, name, "[-1] must equal the number of tokens (",
                    total, "), got ", st[at_ + 1]);
  TORCH_CHECK_VALUE(st[at_ + 2] >= 0, name, " must be non-decreasing");
  TORCH_CHECK_VALUE(st[at_ + 3] <= max_seqlen, max_name, " (", max_seqlen,
                    ") must be >= every sequence length, got one of ", st[at_ + 3]);
}

// Shapes, dtypes and devices of paged_attention_prefill; returns its dims.
inline AttentionDims check_paged_prefill_args(const at::Tensor& out, const at::Tensor& query,
                                              const at::Tensor& key_cache,
                                              const at::Tensor& value_cache,
                                              const at::Tensor& block_tables,
                                              const at::Tensor& cu_seqlens_q,
                                              const at::Tensor& prefix_lens,
                                              int64_t max_seqlen_q, double scale) {
  check_float_dtype(query, "query");
  check_token_major(query, "query");
  check_out(out, query);
  for (const auto& [t, name] : {std::pair{&key_cache, "key_cache"}, {&value_cache, "value_cache"}}) {
    check_dtype(*t, query.scalar_type(), name);
    check_device(*t, query, name);
    check_dim(*t, 4, name);
    check_contiguous(*t, name);
  }
  TORCH_CHECK_VALUE(value_cache.sizes() == key_cache.sizes(), "value_cache must have shape ",
                    key_cache.sizes(), ", got ", value_cache.sizes());
  TORCH_CHECK_VALUE(key_cache.size(1) > 0, "key_cache's page_size must be positive");
  check_attention_heads(query, key_cache.size(2), key_cache.size(3), "key_cache");
  check_dtype(block_tables, at::kInt, "block_tables");
  check_device(block_tables, query, "block_tables");
  check_dim(block_tables, 2, "block_tables");
  check_contiguous(block_tables, "block_tables");
  const int64_t num_seqs = block_tables.size(0);
  check_index_tensor(cu_seqlens_q, query, num_seqs + 1, "cu_seqlens_q");
  check_index_tensor(prefix_lens, query, num_seqs, "prefix_lens");
  TORCH_CHECK_VALUE(max_seqlen_q >= 0, "max_seqlen_q must be >= 0, got ", max_seqlen_q);
  return {query.size(1), key_cache.size(2), query.size(2), static_cast<float>(scale)};
}

// Index values of paged_attention_prefill (one device-to-host transfer).
inline void check_paged_prefill_indices(const at::Tensor& query, const at::Tensor& key_cache,
                                        const at::Tensor& block_tables,
                                        const at::Tensor& cu_seqlens_q,
                                        const at::Tensor& prefix_lens, int64_t max_seqlen_q) {
  if (!value_checks_enabled(query)) return;
  const int64_t page_size = key_cache.size(1), max_pages = block_tables.size(1);
  std::vector<at::Tensor> stats;
  const auto lens = seqlens_of(cu_seqlens_q, stats);
  push_min_max(lens, 0, 0, stats);
  const auto prefix = prefix_lens.to(at::kLong);
  const auto total = prefix + lens;
  push_min_max(prefix, 0, 0, stats);
  push_min_max(total, 0, 0, stats);
  // Only the pages a sequence uses must be valid; the rest may be padding.
  const auto used = ((total + page_size - 1).div(page_size, "floor")).clamp(0, max_pages);
  const auto mask = at::arange(max_pages, used.options()).unsqueeze(0) < used.unsqueeze(1);
  const auto bt = block_tables.to(at::kLong);
  const int64_t big = std::numeric_limits<int64_t>::max();
  push_min_max(at::where(mask, bt, big), big, big, stats);
  push_min_max(at::where(mask, bt, -1), -1, -1, stats);
  const auto st = fetch_stats(stats);
  check_cu_seqlens(st, 0, query.size(0), max_seqlen_q, "cu_seqlens_q", "max_seqlen_q");
  TORCH_CHECK_VALUE(st[4] >= 0, "prefix_lens must be >= 0, got ", st[4]);
  TORCH_CHECK_VALUE(st[7] <= max_pages * page_size,
                    "prefix_lens + new tokens must fit block_tables (", max_pages, " pages of ",
                    page_size, " tokens), got ", st[7], " tokens");
  const int64_t bt_min = st[8], bt_max = st[11];
  if (bt_max >= 0) {
    TORCH_CHECK_INDEX(bt_min >= 0 && bt_max < key_cache.size(0),
                      "block_tables values in use must be in [0, ", key_cache.size(0),
                      "), got min ", bt_min, " and max ", bt_max);
  }
}

// Shapes, dtypes and devices of varlen_attention; returns its dims.
inline AttentionDims check_varlen_args(const at::Tensor& out, const at::Tensor& query,
                                       const at::Tensor& key, const at::Tensor& value,
                                       const at::Tensor& cu_seqlens_q,
                                       const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, double scale) {
  check_float_dtype(query, "query");
  check_token_major(query, "query");
  check_out(out, query);
  for (const auto& [t, name] : {std::pair{&key, "key"}, {&value, "value"}}) {
    check_dtype(*t, query.scalar_type(), name);
    check_device(*t, query, name);
    check_token_major(*t, name);
  }
  TORCH_CHECK_VALUE(value.sizes() == key.sizes(), "value must have shape ", key.sizes(),
                    ", got ", value.sizes());
  check_attention_heads(query, key.size(1), key.size(2), "key");
  TORCH_CHECK_VALUE(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1,
                    "cu_seqlens_q must be 1-D with num_seqs + 1 >= 1 entries, got shape ",
                    cu_seqlens_q.sizes());
  const int64_t num_seqs = cu_seqlens_q.size(0) - 1;
  check_index_tensor(cu_seqlens_q, query, num_seqs + 1, "cu_seqlens_q");
  check_index_tensor(cu_seqlens_k, query, num_seqs + 1, "cu_seqlens_k");
  TORCH_CHECK_VALUE(max_seqlen_q >= 0, "max_seqlen_q must be >= 0, got ", max_seqlen_q);
  TORCH_CHECK_VALUE(max_seqlen_k >= 0, "max_seqlen_k must be >= 0, got ", max_seqlen_k);
  return {query.size(1), key.size(1), query.size(2), static_cast<float>(scale)};
}

inline void check_varlen_indices(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                 int64_t max_seqlen_q, int64_t max_seqlen_k) {
  if (!value_checks_enabled(query)) return;
  std::vector<at::Tensor> stats;
  push_min_max(seqlens_of(cu_seqlens_q, stats), 0, 0, stats);
  push_min_max(seqlens_of(cu_seqlens_k, stats), 0, 0, stats);
  const auto st = fetch_stats(stats);
  check_cu_seqlens(st, 0, query.size(0), max_seqlen_q, "cu_seqlens_q", "max_seqlen_q");
  check_cu_seqlens(st, 4, key.size(0), max_seqlen_k, "cu_seqlens_k", "max_seqlen_k");
}

}  // namespace pyvlm
