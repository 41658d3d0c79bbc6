// Runs every PYVLM_KERNEL_TEST linked into this program and prints the
// plain "N passed, N failed" line that CI reads.
#include <cstdio>

#include "harness.h"

int main() {
  int passed = 0, failed = 0;
  for (const auto& c : pyvlm_test::registry()) {
    int failures = 0;
    c.body(failures);
    std::printf("%-48s %s\n", c.name.c_str(), failures ? "FAILED" : "ok");
    (failures ? failed : passed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
