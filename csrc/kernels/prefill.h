// Prefill-side attention: paged attention over a cached prefix plus a causal
// new span (chunked prefill, prefix-cache hits), and non-causal block-diagonal
// attention over packed variable-length sequences (vision towers,
// cross-attention).
//
// Both are FlashAttention-style: keys are visited in tiles, the softmax is
// computed online in float32, so memory stays O(tile) whatever the length.
#pragma once
#include <cstdint>

namespace pyvlm {

// Sizes shared by both ops. Query head h reads kv head h / (num_heads /
// num_kv_heads) (grouped-query attention).
struct AttentionDims {
  int64_t num_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  float scale;
};

// out: [total_q, num_heads, head_dim] contiguous. query: same shape, last dim
// contiguous, token/head strides given. Caches: contiguous [num_pages,
// page_size, num_kv_heads, head_dim]. New token i of sequence s sits at
// absolute position prefix_lens[s] + i and sees cache positions
// [0, prefix_lens[s] + i]; position p lives in page
// block_tables[s * max_pages_per_seq + p / page_size], offset p % page_size.
template <typename T>
struct PagedPrefillArgs {
  T* out;
  const T* query;
  int64_t q_stride_token, q_stride_head;
  const T* key_cache;
  const T* value_cache;
  const int32_t* block_tables;
  int64_t max_pages_per_seq, page_size;
  const int32_t* cu_seqlens_q;  // [num_seqs + 1]
  const int32_t* prefix_lens;   // [num_seqs]
  int64_t num_seqs;
  AttentionDims dims;
};

// out: [total_q, num_heads, head_dim] contiguous; query/key/value: last dim
// contiguous, token/head strides given. Query i of sequence s sees every key
// of sequence s: rows [cu_seqlens_k[s], cu_seqlens_k[s + 1]) of key/value.
template <typename T>
struct VarlenArgs {
  T* out;
  const T* query;
  int64_t q_stride_token, q_stride_head;
  const T* key;
  int64_t k_stride_token, k_stride_head;
  const T* value;
  int64_t v_stride_token, v_stride_head;
  const int32_t* cu_seqlens_q;  // [num_seqs + 1]
  const int32_t* cu_seqlens_k;  // [num_seqs + 1]
  int64_t num_seqs;
  AttentionDims dims;
};

// CPU work items are (kv head, query block): a query block is up to
// attention_queries_per_block(dims) consecutive queries of one sequence
// together with all the query heads that share the kv head, so each K/V tile
// loaded is reused by every row of the block. cu_blocks (num_seqs + 1
// entries, filled by attention_block_offsets) numbers the query blocks;
// items run over [0, cu_blocks[num_seqs] * num_kv_heads).
int64_t attention_queries_per_block(const AttentionDims& dims);
void attention_block_offsets(const int32_t* cu_seqlens_q, int64_t num_seqs,
                             int64_t queries_per_block, int64_t* cu_blocks);

// CPU kernels over work items [item_begin, item_end); inputs must already be
// validated (indices in range, cu_seqlens monotone).
template <typename T>
void paged_attention_prefill(const PagedPrefillArgs<T>& args,
                             const int64_t* cu_blocks, int64_t item_begin,
                             int64_t item_end);
template <typename T>
void varlen_attention(const VarlenArgs<T>& args, const int64_t* cu_blocks,
                      int64_t item_begin, int64_t item_end);

}  // namespace pyvlm
