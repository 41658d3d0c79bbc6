// CPU adapters for sample and apply_penalties: checks, dtype dispatch and
// threads over rows.
#include <ATen/Parallel.h>

#include "../validate/sampling.h"
#include "dispatch.h"

namespace pyvlm {
namespace {

void sample_cpu(at::Tensor& out_tokens, at::Tensor& out_logprobs, at::Tensor& out_top_ids,
                at::Tensor& out_top_logprobs, const at::Tensor& logits,
                const at::Tensor& temperatures, const at::Tensor& top_ks,
                const at::Tensor& top_ps, const at::Tensor& min_ps, const at::Tensor& seeds,
                const at::Tensor& steps) {
  const int64_t num_top = check_sample(out_tokens, out_logprobs, out_top_ids, out_top_logprobs,
                                       logits, temperatures, top_ks, top_ps, min_ps, seeds,
                                       steps);
  check_sample_ranges(temperatures, top_ps, min_ps);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  if (batch == 0) return;
  const SamplingParams params{temperatures.data_ptr<float>(), top_ks.data_ptr<int32_t>(),
                              top_ps.data_ptr<float>(),       min_ps.data_ptr<float>(),
                              seeds.data_ptr<int64_t>(),      steps.data_ptr<int64_t>()};
  const SampleOutputs out{out_tokens.data_ptr<int64_t>(), out_logprobs.data_ptr<float>(),
                          out_top_ids.data_ptr<int64_t>(), out_top_logprobs.data_ptr<float>(),
                          num_top};
  PYVLM_CPU_DISPATCH_FLOAT(logits.scalar_type(), "sample", [&] {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      sample_rows(data_as<const scalar_t>(logits), vocab, params, out, begin, end);
    });
  });
}

void apply_penalties_cpu(at::Tensor& logits, const at::Tensor& token_ids,
                         const at::Tensor& output_counts, const at::Tensor& cu_token_rows,
                         const at::Tensor& presence_penalties,
                         const at::Tensor& frequency_penalties,
                         const at::Tensor& repetition_penalties,
                         const at::Tensor& bias_token_ids, const at::Tensor& bias_values,
                         const at::Tensor& cu_bias_rows) {
  check_apply_penalties(logits, token_ids, output_counts, cu_token_rows, presence_penalties,
                        frequency_penalties, repetition_penalties, bias_token_ids, bias_values,
                        cu_bias_rows);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  if (batch == 0) return;
  const PenaltyParams p{token_ids.data_ptr<int64_t>(),      output_counts.data_ptr<int32_t>(),
                        cu_token_rows.data_ptr<int32_t>(),  presence_penalties.data_ptr<float>(),
                        frequency_penalties.data_ptr<float>(),
                        repetition_penalties.data_ptr<float>(), bias_token_ids.data_ptr<int64_t>(),
                        bias_values.data_ptr<float>(),      cu_bias_rows.data_ptr<int32_t>()};
  PYVLM_CPU_DISPATCH_FLOAT(logits.scalar_type(), "apply_penalties", [&] {
    at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
      apply_penalties_rows(data_as<scalar_t>(logits), vocab, p, begin, end);
    });
  });
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CPU, m) {
  m.impl("sample", &pyvlm::sample_cpu);
  m.impl("apply_penalties", &pyvlm::apply_penalties_cpu);
}
