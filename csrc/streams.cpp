// green_context_stream in a build without CUDA (the CUDA build's is
// csrc/cuda/green_context.cu): a clear error, as the op's only kernel.
#include <torch/library.h>

#include <vector>

#ifndef PYVLM_WITH_CUDA
namespace pyvlm {
namespace {

std::vector<int64_t> green_context_stream_without_cuda(int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "green_context_stream: this build of pyvlm's extension has no CUDA");
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CompositeExplicitAutograd, m) {
  m.impl("green_context_stream", &pyvlm::green_context_stream_without_cuda);
}
#endif
