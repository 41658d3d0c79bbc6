// CPU adapters for reshape_and_cache and paged_attention_decode: checks,
// dtype dispatch and threads.
#include <ATen/Parallel.h>

#include "../kernels/attention.h"
#include "../validate/attention.h"
#include "dispatch.h"

namespace pyvlm {
namespace {

template <typename T>
CacheWriteArgs<T> cache_write_args(const at::Tensor& key, const at::Tensor& value,
                                   at::Tensor& key_cache, at::Tensor& value_cache,
                                   const at::Tensor& slot_mapping) {
  return {data_as<T>(key), data_as<T>(value), data_as<T>(key_cache), data_as<T>(value_cache),
          slot_mapping.data_ptr<int64_t>(), key.stride(0), key.stride(1), value.stride(0),
          value.stride(1), key.size(1), key.size(2), key_cache.size(0) * key_cache.size(1)};
}

void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value,
                           at::Tensor& key_cache, at::Tensor& value_cache,
                           const at::Tensor& slot_mapping) {
  check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
  const int64_t row_elems = std::max<int64_t>(1, key.size(1) * key.size(2));
  PYVLM_CPU_DISPATCH_FLOAT(key.scalar_type(), "reshape_and_cache", [&] {
    const auto args =
        cache_write_args<scalar_t>(key, value, key_cache, value_cache, slot_mapping);
    at::parallel_for(0, key.size(0), std::max<int64_t>(1, 16384 / row_elems),
                     [&](int64_t begin, int64_t end) { reshape_and_cache(args, begin, end); });
  });
}

void paged_attention_decode_cpu(at::Tensor& out, const at::Tensor& query,
                                const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                double scale) {
  check_paged_attention_decode(out, query, key_cache, value_cache, block_tables, seq_lens);
  check_decode_index_stats(decode_index_stats_cpu(block_tables, seq_lens, key_cache.size(1)),
                           block_tables.size(1), key_cache.size(1), key_cache.size(0));
  const int64_t num_items = query.size(0) * key_cache.size(2);
  PYVLM_CPU_DISPATCH_FLOAT(query.scalar_type(), "paged_attention_decode", [&] {
    const auto args = make_paged_decode_args<scalar_t>(out, query, key_cache, value_cache, block_tables,
                                            seq_lens, scale);
    // One item is a whole (sequence, KV head) context: worth a thread each.
    at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
      paged_attention_decode(args, begin, end);
    });
  });
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CPU, m) {
  m.impl("reshape_and_cache", &pyvlm::reshape_and_cache_cpu);
  m.impl("paged_attention_decode", &pyvlm::paged_attention_decode_cpu);
}
