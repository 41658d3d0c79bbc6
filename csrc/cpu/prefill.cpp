// CPU adapters for paged_attention_prefill and varlen_attention: checks,
// dtype dispatch and threads over (kv head, query block) work items.
#include <ATen/Parallel.h>

#include <vector>

#include "../validate/prefill.h"
#include "dispatch.h"

namespace pyvlm {
namespace {

// Numbers the query blocks of every sequence (see prefill.h).
std::vector<int64_t> query_block_offsets(const at::Tensor& cu_seqlens_q,
                                         const AttentionDims& dims) {
  const int64_t num_seqs = cu_seqlens_q.size(0) - 1;
  std::vector<int64_t> cu_blocks(num_seqs + 1);
  attention_block_offsets(cu_seqlens_q.data_ptr<int32_t>(), num_seqs,
                          attention_queries_per_block(dims), cu_blocks.data());
  return cu_blocks;
}

// Runs body(begin, end) over all work items on the intra-op thread pool.
template <typename F>
void for_each_item(const std::vector<int64_t>& cu_blocks, const AttentionDims& dims,
                   const F& body) {
  const int64_t num_items = cu_blocks.back() * dims.num_kv_heads;
  if (num_items == 0 || dims.head_dim == 0) return;
  at::parallel_for(0, num_items, 1, body);
}

void paged_attention_prefill_cpu(at::Tensor& out, const at::Tensor& query,
                                 const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q,
                                 const at::Tensor& prefix_lens, int64_t max_seqlen_q,
                                 double scale) {
  const AttentionDims dims =
      check_paged_prefill_args(out, query, key_cache, value_cache, block_tables, cu_seqlens_q,
                               prefix_lens, max_seqlen_q, scale);
  check_paged_prefill_indices(query, key_cache, block_tables, cu_seqlens_q, prefix_lens,
                              max_seqlen_q);
  const auto cu_blocks = query_block_offsets(cu_seqlens_q, dims);
  PYVLM_CPU_DISPATCH_FLOAT(query.scalar_type(), "paged_attention_prefill", [&] {
    const PagedPrefillArgs<scalar_t> args{
        data_as<scalar_t>(out),         data_as<scalar_t>(query),
        query.stride(0),                query.stride(1),
        data_as<scalar_t>(key_cache),   data_as<scalar_t>(value_cache),
        block_tables.data_ptr<int32_t>(), block_tables.size(1),
        key_cache.size(1),              cu_seqlens_q.data_ptr<int32_t>(),
        prefix_lens.data_ptr<int32_t>(), block_tables.size(0),
        dims};
    for_each_item(cu_blocks, dims, [&](int64_t begin, int64_t end) {
      paged_attention_prefill(args, cu_blocks.data(), begin, end);
    });
  });
}

void varlen_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key,
                          const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                          const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                          int64_t max_seqlen_k, double scale) {
  const AttentionDims dims = check_varlen_args(out, query, key, value, cu_seqlens_q,
                                               cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  check_varlen_indices(query, key, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const auto cu_blocks = query_block_offsets(cu_seqlens_q, dims);
  PYVLM_CPU_DISPATCH_FLOAT(query.scalar_type(), "varlen_attention", [&] {
    const VarlenArgs<scalar_t> args{
        data_as<scalar_t>(out),   data_as<scalar_t>(query),  query.stride(0), query.stride(1),
        data_as<scalar_t>(key),   key.stride(0),             key.stride(1),
        data_as<scalar_t>(value), value.stride(0),           value.stride(1),
        cu_seqlens_q.data_ptr<int32_t>(), cu_seqlens_k.data_ptr<int32_t>(),
        cu_seqlens_q.size(0) - 1, dims};
    for_each_item(cu_blocks, dims, [&](int64_t begin, int64_t end) {
      varlen_attention(args, cu_blocks.data(), begin, end);
    });
  });
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CPU, m) {
  m.impl("paged_attention_prefill", &pyvlm::paged_attention_prefill_cpu);
  m.impl("varlen_attention", &pyvlm::varlen_attention_cpu);
}
