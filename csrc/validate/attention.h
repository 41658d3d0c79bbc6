// Argument checks for reshape_and_cache and paged_attention_decode, shared
// by the CPU and CUDA adapters.
#pragma once
#include <algorithm>
#include <limits>

#include "../checks.h"
#include "../kernels/attention.h"

namespace pyvlm {

// Only the last dimension must be contiguous: engines pass views of a fused
// qkv projection whose token and head strides are arbitrary.
inline void check_rows_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
                    "'s last dimension must be contiguous (stride 1), got strides ",
                    t.strides());
}

// A paged cache: contiguous [num_pages, page_size, num_kv_heads, head_dim].
inline void check_cache(const at::Tensor& cache, const at::Tensor& like,
                        const char* name) {
  check_dim(cache, 4, name);
  check_dtype(cache, like.scalar_type(), name);
  check_device(cache, like, name);
  check_contiguous(cache, name);
  TORCH_CHECK_VALUE(cache.size(1) >= 1, name, ": page_size (dim 1) must be >= 1, got shape ",
                    cache.sizes());
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& like,
                             const char* name, const char* like_name) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), name, " must have the shape of ", like_name,
                    " ", like.sizes(), ", got ", t.sizes());
}

// slot_mapping may hold negative slots (padding, skipped) but none at or
// past the cache's num_pages * page_size slots.
inline void check_slots(const at::Tensor& slot_mapping, int64_t num_slots) {
  if (slot_mapping.numel() == 0) return;
  if (!slot_mapping.is_cpu() && !index_checks_enabled()) return;
  const int64_t vmax = slot_mapping.max().item<int64_t>();
  TORCH_CHECK_INDEX(vmax < num_slots, "slot_mapping values must be < num_pages * page_size = ",
                    num_slots, " (negative = skip), got max ", vmax);
}

inline void check_reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                                    const at::Tensor& key_cache,
                                    const at::Tensor& value_cache,
                                    const at::Tensor& slot_mapping) {
  check_float_dtype(key, "key");
  check_dim(key, 3, "key");
  check_rows_contiguous(key, "key");
  check_dtype(value, key.scalar_type(), "value");
  check_device(value, key, "value");
  check_same_shape(value, key, "value", "key");
  check_rows_contiguous(value, "value");
  check_cache(key_cache, key, "key_cache");
  check_cache(value_cache, key, "value_cache");
  check_same_shape(value_cache, key_cache, "value_cache", "key_cache");
  check_size(key_cache, 2, key.size(1), "key_cache");
  check_size(key_cache, 3, key.size(2), "key_cache");
  check_dtype(slot_mapping, at::kLong, "slot_mapping");
  check_device(slot_mapping, key, "slot_mapping");
  check_dim(slot_mapping, 1, "slot_mapping");
  check_contiguous(slot_mapping, "slot_mapping");
  check_size(slot_mapping, 0, key.size(0), "slot_mapping");
  check_slots(slot_mapping, key_cache.size(0) * key_cache.size(1));
}

// Ranges of the decode indices: seq_lens, and the block-table entries the
// sequences use (their first ceil(seq_len / page_size)); min_page > max_page
// when no sequence uses a page.
struct DecodeIndexStats {
  int64_t min_len, max_len, min_page, max_page;
};

inline DecodeIndexStats decode_index_stats_cpu(const at::Tensor& block_tables,
                                               const at::Tensor& seq_lens, int64_t page_size) {
  DecodeIndexStats st{std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min(),
                      std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min()};
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_tables.data_ptr<int32_t>();
  const int64_t max_pages = block_tables.size(1), stride = block_tables.stride(0);
  for (int64_t s = 0; s < seq_lens.size(0); ++s) {
    st.min_len = std::min<int64_t>(st.min_len, lens[s]);
    st.max_len = std::max<int64_t>(st.max_len, lens[s]);
    const int64_t used = std::min(max_pages, (std::max<int64_t>(lens[s], 0) + page_size - 1) / page_size);
    for (int64_t i = 0; i < used; ++i) {
      st.min_page = std::min<int64_t>(st.min_page, table[s * stride + i]);
      st.max_page = std::max<int64_t>(st.max_page, table[s * stride + i]);
    }
  }
  return st;
}

// seq_lens must lie in [0, max_pages_per_seq * page_size] and every block
// table entry a sequence uses in [0, num_pages).
inline void check_decode_index_stats(const DecodeIndexStats& st, int64_t max_pages_per_seq,
                                     int64_t page_size, int64_t num_pages) {
  const int64_t max_len = max_pages_per_seq * page_size;
  TORCH_CHECK_INDEX(st.min_len >= 0 && st.max_len <= max_len, "seq_lens values must be in [0, ",
                    max_len, "] (max_pages_per_seq * page_size), got min ", st.min_len,
                    " and max ", st.max_len);
  if (st.min_page > st.max_page) return;  // no sequence uses a page
  TORCH_CHECK_INDEX(st.min_page >= 0 && st.max_page < num_pages,
                    "block_tables entries used by seq_lens must be in [0, ", num_pages,
                    "), got min ", st.min_page, " and max ", st.max_page);
}

// Shapes, dtypes and devices; the index ranges are checked by the adapters
// (check_decode_index_stats), which compute their stats where the data is.
inline void check_paged_attention_decode(const at::Tensor& out, const at::Tensor& query,
                                         const at::Tensor& key_cache,
                                         const at::Tensor& value_cache,
                                         const at::Tensor& block_tables,
                                         const at::Tensor& seq_lens) {
  check_float_dtype(query, "query");
  check_dim(query, 3, "query");
  check_rows_contiguous(query, "query");
  check_dtype(out, query.scalar_type(), "out");
  check_device(out, query, "out");
  check_same_shape(out, query, "out", "query");
  check_contiguous(out, "out");
  check_cache(key_cache, query, "key_cache");
  check_cache(value_cache, query, "value_cache");
  check_same_shape(value_cache, key_cache, "value_cache", "key_cache");
  check_size(key_cache, 3, query.size(2), "key_cache");
  const int64_t num_kv_heads = key_cache.size(2);
  TORCH_CHECK_VALUE(num_kv_heads >= 1 && query.size(1) % num_kv_heads == 0,
                    "query's num_heads (", query.size(1),
                    ") must be a multiple of key_cache's num_kv_heads (", num_kv_heads, ")");
  check_dtype(block_tables, at::kInt, "block_tables");
  check_device(block_tables, query, "block_tables");
  check_dim(block_tables, 2, "block_tables");
  check_size(block_tables, 0, query.size(0), "block_tables");
  check_rows_contiguous(block_tables, "block_tables");
  check_dtype(seq_lens, at::kInt, "seq_lens");
  check_device(seq_lens, query, "seq_lens");
  check_dim(seq_lens, 1, "seq_lens");
  check_contiguous(seq_lens, "seq_lens");
  check_size(seq_lens, 0, query.size(0), "seq_lens");
}

// Packs the checked tensors into the kernels' plain argument struct; T is
// the device storage type (float, half_t/bf16_t or __half/__nv_bfloat16).
template <typename T>
inline PagedDecodeArgs<T> make_paged_decode_args(at::Tensor& out, const at::Tensor& query,
                               const at::Tensor& key_cache, const at::Tensor& value_cache,
                               const at::Tensor& block_tables, const at::Tensor& seq_lens,
                               double scale) {
  return {reinterpret_cast<T*>(out.data_ptr()),
          reinterpret_cast<const T*>(query.data_ptr()),
          reinterpret_cast<const T*>(key_cache.data_ptr()),
          reinterpret_cast<const T*>(value_cache.data_ptr()),
          block_tables.data_ptr<int32_t>(),
          seq_lens.data_ptr<int32_t>(),
          query.stride(0),
          query.stride(1),
          block_tables.stride(0),
          query.size(0),
          query.size(1),
          key_cache.size(2),
          query.size(2),
          key_cache.size(0),
          key_cache.size(1),
          block_tables.size(1),
          static_cast<float>(scale)};
}

}  // namespace pyvlm
