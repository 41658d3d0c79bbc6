// Paged KV cache writes and single-token (decode) attention over it.
//
// Cache layout, shared with the CUDA kernels: [num_pages, page_size,
// num_kv_heads, head_dim], contiguous; token slot s lives on page
// s / page_size at offset s % page_size.
#pragma once
#include <cstdint>

namespace pyvlm {

// key/value rows: [num_tokens, num_kv_heads, head_dim] with the last dim
// contiguous and element strides for the first two (views of a fused qkv
// projection are not contiguous).
template <typename T>
struct CacheWriteArgs {
  const T* key;
  const T* value;
  T* key_cache;
  T* value_cache;
  const int64_t* slot_mapping;  // [num_tokens]; negative = skip the token
  int64_t key_stride_token, key_stride_head;
  int64_t value_stride_token, value_stride_head;
  int64_t num_kv_heads, head_dim;
  int64_t num_slots;  // num_pages * page_size; slots past it are skipped
};

// CPU: scatters tokens [token_begin, token_end) into the caches.
template <typename T>
void reshape_and_cache(const CacheWriteArgs<T>& args, int64_t token_begin,
                       int64_t token_end);

// One query token per sequence against that sequence's cached pages:
// out[s, h] = softmax(scale * q[s, h] . K[s, 0:seq_len]) V[s, 0:seq_len],
// query head h reading KV head h / (num_heads / num_kv_heads) (GQA/MQA).
template <typename T>
struct PagedDecodeArgs {
  T* out;  // [num_seqs, num_heads, head_dim], contiguous
  const T* query;  // [num_seqs, num_heads, head_dim], last dim contiguous
  const T* key_cache;
  const T* value_cache;
  const int32_t* block_tables;  // [num_seqs, max_pages_per_seq], row stride below
  const int32_t* seq_lens;      // [num_seqs]
  int64_t query_stride_seq, query_stride_head;
  int64_t block_table_stride;
  int64_t num_seqs, num_heads, num_kv_heads, head_dim;
  int64_t num_pages, page_size, max_pages_per_seq;
  float scale;
};

// CPU: work item i is (sequence i / num_kv_heads, KV head i % num_kv_heads)
// and covers every query head of that GQA group, so each cached K/V row is
// read once. Runs items [item_begin, item_end).
template <typename T>
void paged_attention_decode(const PagedDecodeArgs<T>& args, int64_t item_begin,
                            int64_t item_end);

}  // namespace pyvlm
