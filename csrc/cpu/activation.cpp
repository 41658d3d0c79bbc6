// CPU adapters for the gated activations: dtype dispatch and threads.
#include <ATen/Parallel.h>

#include "../validate/activation.h"
#include "dispatch.h"

namespace pyvlm {
namespace {

void act_and_mul_cpu(at::Tensor& out, const at::Tensor& input, Activation act) {
  const int64_t num_tokens = check_act_and_mul(out, input);
  const int64_t d = out.size(-1);
  PYVLM_CPU_DISPATCH_FLOAT(input.scalar_type(), "act_and_mul", [&] {
    at::parallel_for(0, num_tokens, std::max<int64_t>(1, 4096 / (d + 1)),
                     [&](int64_t begin, int64_t end) {
                       act_and_mul(data_as<scalar_t>(out), data_as<scalar_t>(input),
                                   d, begin, end, act);
                     });
  });
}

void silu_and_mul(at::Tensor& out, const at::Tensor& input) {
  act_and_mul_cpu(out, input, Activation::kSilu);
}

void gelu_and_mul(at::Tensor& out, const at::Tensor& input,
                  c10::string_view approximate) {
  act_and_mul_cpu(out, input, parse_gelu_approximate(approximate));
}

void quick_gelu_cpu(at::Tensor& out, const at::Tensor& input) {
  const int64_t n = check_quick_gelu(out, input);
  PYVLM_CPU_DISPATCH_FLOAT(input.scalar_type(), "quick_gelu", [&] {
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      quick_gelu(data_as<scalar_t>(out), data_as<scalar_t>(input), begin, end);
    });
  });
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CPU, m) {
  m.impl("silu_and_mul", &pyvlm::silu_and_mul);
  m.impl("gelu_and_mul", &pyvlm::gelu_and_mul);
  m.impl("quick_gelu", &pyvlm::quick_gelu_cpu);
}
