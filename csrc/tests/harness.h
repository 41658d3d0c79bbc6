// A tiny self-registering test harness for the framework-free kernels (no
// gtest, no torch): each test file adds cases with PYVLM_KERNEL_TEST and
// checks with EXPECT_NEAR_REL / EXPECT_TRUE; main.cpp runs them all.
#pragma once
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace pyvlm_test {

struct Case {
  std::string name;
  std::function<void(int&)> body;  // increments the failure count
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Registrar {
  Registrar(const char* name, std::function<void(int&)> body) {
    registry().push_back({name, std::move(body)});
  }
};

inline std::mt19937& rng() {
  static std::mt19937 gen(std::random_device{}());
  return gen;
}

inline std::vector<float> random_floats(size_t n, float scale = 1.f) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng());
  return v;
}

// ||a - b|| / ||b|| over two equally long sequences.
template <typename A, typename B>
double rel_err(const A& a, const B& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    const double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * double(b[i]);
  }
  if (std::isnan(num)) return INFINITY;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

}  // namespace pyvlm_test

#define PYVLM_TEST_CONCAT_(a, b) a##b
#define PYVLM_TEST_CONCAT(a, b) PYVLM_TEST_CONCAT_(a, b)
#define PYVLM_KERNEL_TEST(name)                                               \
  static void PYVLM_TEST_CONCAT(test_fn_, name)(int& failures__);             \
  static ::pyvlm_test::Registrar PYVLM_TEST_CONCAT(test_reg_, name)(         \
      #name, PYVLM_TEST_CONCAT(test_fn_, name));                              \
  static void PYVLM_TEST_CONCAT(test_fn_, name)(int& failures__)

#define EXPECT_TRUE(cond)                                                     \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      ++failures__;                                                           \
    }                                                                         \
  } while (0)

#define EXPECT_NEAR_REL(out, ref, tol)                                        \
  do {                                                                        \
    const double err__ = ::pyvlm_test::rel_err(out, ref);                     \
    if (!(err__ < (tol))) {                                                   \
      std::fprintf(stderr, "%s:%d: relative error %g >= %g\n", __FILE__,      \
                   __LINE__, err__, double(tol));                             \
      ++failures__;                                                           \
    }                                                                         \
  } while (0)
