// The per-thread index-check setting declared in checks.h. It lives in this
// one translation unit so every adapter (C++ and CUDA objects alike) reads the
// same thread-local variable.
#include "checks.h"

#include <cstdlib>
#include <cstring>

namespace pyvlm {
namespace {

// Read once, when the extension loads: the user's explicit setting is the
// default of every thread; nothing in pyvlm writes the variable.
const bool kProcessDefault = [] {
  const char* v = std::getenv("PYVLM_CHECK_INDICES");
  return v == nullptr || std::strcmp(v, "0") != 0;
}();

thread_local bool tls_index_checks = kProcessDefault;

}  // namespace

bool index_checks_enabled() { return tls_index_checks; }

bool set_index_checks(bool enabled) {
  const bool previous = tls_index_checks;
  tls_index_checks = enabled;
  return previous;
}

}  // namespace pyvlm

// No tensor arguments, so no device to dispatch on: one kernel for all keys.
TORCH_LIBRARY_IMPL(pyvlm, CompositeExplicitAutograd, m) {
  m.impl("set_index_checks", &pyvlm::set_index_checks);
  m.impl("index_checks_enabled", &pyvlm::index_checks_enabled);
}
