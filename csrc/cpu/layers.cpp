// CPU adapters for the layer ops: dtype dispatch and threads.
#include <ATen/Parallel.h>

#include "../validate/layers.h"
#include "dispatch.h"

namespace pyvlm {
namespace {

// Rows per thread chunk so that each chunk touches at least ~16K elements.
int64_t grain_for(int64_t row_elems) {
  return std::max<int64_t>(1, 16384 / (row_elems + 1));
}

void rms_norm_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                  double epsilon) {
  const int64_t rows = check_rms_norm(out, input, weight, epsilon);
  const int64_t hidden = input.size(-1);
  PYVLM_CPU_DISPATCH_FLOAT(input.scalar_type(), "rms_norm", [&] {
    at::parallel_for(0, rows, grain_for(hidden), [&](int64_t begin, int64_t end) {
      rms_norm(data_as<scalar_t>(out), data_as<scalar_t>(input), data_as<scalar_t>(weight),
               hidden, static_cast<float>(epsilon), begin, end);
    });
  });
}

void fused_add_rms_norm_cpu(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                            double epsilon) {
  const int64_t rows = check_fused_add_rms_norm(input, residual, weight, epsilon);
  const int64_t hidden = input.size(-1);
  PYVLM_CPU_DISPATCH_FLOAT(input.scalar_type(), "fused_add_rms_norm", [&] {
    at::parallel_for(0, rows, grain_for(hidden), [&](int64_t begin, int64_t end) {
      fused_add_rms_norm(data_as<scalar_t>(input), data_as<scalar_t>(residual),
                         data_as<scalar_t>(weight), hidden, static_cast<float>(epsilon),
                         begin, end);
    });
  });
}

// Calls body with the cache pointer typed float or scalar_t.
template <typename scalar_t, typename Body>
void dispatch_cache(const at::Tensor& cache, Body&& body) {
  if (cache.scalar_type() == at::kFloat) {
    body(static_cast<const float*>(cache.data_ptr()));
  } else {
    body(static_cast<const scalar_t*>(cache.data_ptr()));
  }
}

int64_t rotated_elems_per_token(const RotaryLayout& l) {
  return (l.num_q_heads + l.num_k_heads) * l.rotary_dim;
}

void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                          int64_t head_size, const at::Tensor& cos_sin_cache, bool is_neox) {
  const int64_t num_tokens = query.dim() > 0 ? query.size(0) : 0;
  const RotaryLayout layout =
      check_rotary_operands(query, key, head_size, cos_sin_cache, is_neox, num_tokens);
  check_positions_1d(positions, query, layout.max_position);
  check_size(positions, 0, num_tokens, "positions");
  PYVLM_CPU_DISPATCH_FLOAT(query.scalar_type(), "rotary_embedding", [&] {
    dispatch_cache<scalar_t>(cos_sin_cache, [&](auto* cache) {
      at::parallel_for(0, num_tokens, grain_for(rotated_elems_per_token(layout)),
                       [&](int64_t begin, int64_t end) {
                         rotary_embedding(positions.data_ptr<int64_t>(),
                                          data_as<scalar_t>(query), data_as<scalar_t>(key),
                                          cache, layout, begin, end);
                       });
    });
  });
}

void mrope_cpu(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
               int64_t head_size, const at::Tensor& cos_sin_cache,
               at::IntArrayRef mrope_section, bool is_neox) {
  const int64_t num_tokens = query.dim() > 0 ? query.size(0) : 0;
  const RotaryLayout layout =
      check_rotary_operands(query, key, head_size, cos_sin_cache, is_neox, num_tokens);
  check_positions_mrope(positions, query, layout.max_position);
  check_size(positions, 1, num_tokens, "positions");
  const MropeSections sections = check_mrope_sections(mrope_section, layout.rotary_dim, positions);
  PYVLM_CPU_DISPATCH_FLOAT(query.scalar_type(), "mrope", [&] {
    dispatch_cache<scalar_t>(cos_sin_cache, [&](auto* cache) {
      at::parallel_for(0, num_tokens, grain_for(rotated_elems_per_token(layout)),
                       [&](int64_t begin, int64_t end) {
                         mrope(positions.data_ptr<int64_t>(), data_as<scalar_t>(query),
                               data_as<scalar_t>(key), cache, layout, sections, begin, end);
                       });
    });
  });
}

void merge_multimodal_embeddings_cpu(at::Tensor& inputs_embeds, const at::Tensor& mm_embeds,
                                     const at::Tensor& positions) {
  check_merge(inputs_embeds, mm_embeds, positions);
  const int64_t elem = inputs_embeds.element_size();
  const int64_t row_bytes = inputs_embeds.size(1) * elem;
  if (row_bytes == 0) return;
  at::parallel_for(0, mm_embeds.size(0), grain_for(inputs_embeds.size(1)),
                   [&](int64_t begin, int64_t end) {
                     merge_rows(static_cast<char*>(inputs_embeds.data_ptr()),
                                inputs_embeds.stride(0) * elem, inputs_embeds.size(0),
                                static_cast<const char*>(mm_embeds.data_ptr()),
                                mm_embeds.stride(0) * elem, row_bytes,
                                positions.data_ptr<int64_t>(), begin, end);
                   });
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CPU, m) {
  m.impl("rms_norm", &pyvlm::rms_norm_cpu);
  m.impl("fused_add_rms_norm", &pyvlm::fused_add_rms_norm_cpu);
  m.impl("rotary_embedding", &pyvlm::rotary_embedding_cpu);
  m.impl("mrope", &pyvlm::mrope_cpu);
  m.impl("merge_multimodal_embeddings", &pyvlm::merge_multimodal_embeddings_cpu);
}
