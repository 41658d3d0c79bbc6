// Layer kernels against naive double-precision loops.
#include <cmath>
#include <vector>

#include "../kernels/dtypes.h"
#include "../kernels/layers.h"
#include "harness.h"

namespace {

std::vector<double> naive_rms_norm(const std::vector<float>& x, const std::vector<float>& w,
                                   int64_t rows, int64_t hidden, double eps) {
  std::vector<double> out(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < hidden; ++i) ss += double(x[r * hidden + i]) * x[r * hidden + i];
    const double inv = 1 / std::sqrt(ss / hidden + eps);
    for (int64_t i = 0; i < hidden; ++i) out[r * hidden + i] = x[r * hidden + i] * inv * w[i];
  }
  return out;
}

// cos/sin table [max_position, rot]: angle(p, j) = p * 10000^(-2j / rot).
std::vector<float> make_cache(int64_t max_position, int64_t rot) {
  std::vector<float> cache(max_position * rot);
  for (int64_t p = 0; p < max_position; ++p)
    for (int64_t j = 0; j < rot / 2; ++j) {
      const double a = p * std::pow(10000.0, -2.0 * j / rot);
      cache[p * rot + j] = float(std::cos(a));
      cache[p * rot + rot / 2 + j] = float(std::sin(a));
    }
  return cache;
}

// Rotates head vectors of length head_size (first rot elements) in double.
void naive_rotate(std::vector<double>& x, int64_t heads, int64_t head_size, int64_t rot,
                  const double* cos, const double* sin, bool neox) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t j = 0; j < rot / 2; ++j) {
      const int64_t i1 = h * head_size + (neox ? j : 2 * j);
      const int64_t i2 = h * head_size + (neox ? j + rot / 2 : 2 * j + 1);
      const double a = x[i1], b = x[i2];
      x[i1] = a * cos[j] - b * sin[j];
      x[i2] = b * cos[j] + a * sin[j];
    }
}

}  // namespace

PYVLM_KERNEL_TEST(rms_norm_float) {
  const int64_t rows = 3, hidden = 70;
  auto x = pyvlm_test::random_floats(rows * hidden, 2.f);
  auto w = pyvlm_test::random_floats(hidden);
  std::vector<float> out(x.size(), NAN);
  pyvlm::rms_norm(out.data(), x.data(), w.data(), hidden, 1e-6f, 0, rows);
  EXPECT_NEAR_REL(out, naive_rms_norm(x, w, rows, hidden, 1e-6), 1e-6);
}

PYVLM_KERNEL_TEST(fused_add_rms_norm_bf16) {
  const int64_t rows = 2, hidden = 64;
  auto a = pyvlm_test::random_floats(rows * hidden), b = pyvlm_test::random_floats(rows * hidden);
  auto wf = pyvlm_test::random_floats(hidden);
  std::vector<pyvlm::bf16_t> in(a.size()), res(a.size()), w(hidden);
  std::vector<float> sum(a.size()), wr(hidden);
  for (size_t i = 0; i < a.size(); ++i) {
    in[i] = pyvlm::from_float<pyvlm::bf16_t>(a[i]);
    res[i] = pyvlm::from_float<pyvlm::bf16_t>(b[i]);
    sum[i] = pyvlm::to_float(in[i]) + pyvlm::to_float(res[i]);
  }
  for (int64_t i = 0; i < hidden; ++i) {
    w[i] = pyvlm::from_float<pyvlm::bf16_t>(wf[i]);
    wr[i] = pyvlm::to_float(w[i]);
  }
  pyvlm::fused_add_rms_norm(in.data(), res.data(), w.data(), hidden, 1e-6f, 0, rows);
  std::vector<float> got_res(a.size()), got(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    got_res[i] = pyvlm::to_float(res[i]);
    got[i] = pyvlm::to_float(in[i]);
  }
  EXPECT_NEAR_REL(got_res, sum, 1e-2);
  EXPECT_NEAR_REL(got, naive_rms_norm(got_res, wr, rows, hidden, 1e-6), 1e-2);
}

PYVLM_KERNEL_TEST(rotary_partial_gptj_and_neox) {
  const int64_t tokens = 4, qh = 3, kh = 1, hs = 16, rot = 8, max_pos = 32;
  const auto cache = make_cache(max_pos, rot);
  const int64_t positions[tokens] = {0, 5, 31, 7};
  for (bool neox : {true, false}) {
    auto q = pyvlm_test::random_floats(tokens * qh * hs);
    auto k = pyvlm_test::random_floats(tokens * kh * hs);
    std::vector<double> rq(q.begin(), q.end()), rk(k.begin(), k.end());
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<double> c(rot / 2), s(rot / 2), tq(rq.begin() + t * qh * hs,
                                                      rq.begin() + (t + 1) * qh * hs),
          tk(rk.begin() + t * kh * hs, rk.begin() + (t + 1) * kh * hs);
      for (int64_t j = 0; j < rot / 2; ++j) {
        c[j] = cache[positions[t] * rot + j];
        s[j] = cache[positions[t] * rot + rot / 2 + j];
      }
      naive_rotate(tq, qh, hs, rot, c.data(), s.data(), neox);
      naive_rotate(tk, kh, hs, rot, c.data(), s.data(), neox);
      std::copy(tq.begin(), tq.end(), rq.begin() + t * qh * hs);
      std::copy(tk.begin(), tk.end(), rk.begin() + t * kh * hs);
    }
    const pyvlm::RotaryLayout layout{qh, qh * hs, hs, kh, kh * hs, hs, rot, max_pos, neox};
    pyvlm::rotary_embedding(positions, q.data(), k.data(), cache.data(), layout, 0, tokens);
    EXPECT_NEAR_REL(q, rq, 1e-6);
    EXPECT_NEAR_REL(k, rk, 1e-6);
  }
}

PYVLM_KERNEL_TEST(mrope_sections_pick_position_rows) {
  // One token, one head: frequencies 0-1 use row t, 2-4 row h, 5-7 row w.
  const int64_t hs = 16, rot = 16, max_pos = 64;
  const auto cache = make_cache(max_pos, rot);
  const int64_t positions[3] = {3, 40, 17};
  auto q = pyvlm_test::random_floats(hs), k = pyvlm_test::random_floats(hs);
  std::vector<double> rq(q.begin(), q.end()), rk(k.begin(), k.end());
  std::vector<double> c(rot / 2), s(rot / 2);
  const int64_t row_of[8] = {0, 0, 1, 1, 1, 2, 2, 2};
  for (int64_t j = 0; j < rot / 2; ++j) {
    c[j] = cache[positions[row_of[j]] * rot + j];
    s[j] = cache[positions[row_of[j]] * rot + rot / 2 + j];
  }
  naive_rotate(rq, 1, hs, rot, c.data(), s.data(), true);
  naive_rotate(rk, 1, hs, rot, c.data(), s.data(), true);
  const pyvlm::RotaryLayout layout{1, hs, hs, 1, hs, hs, rot, max_pos, true};
  const pyvlm::MropeSections sections{3, {2, 5, 8}, 1};
  pyvlm::mrope(positions, q.data(), k.data(), cache.data(), layout, sections, 0, 1);
  EXPECT_NEAR_REL(q, rq, 1e-6);
  EXPECT_NEAR_REL(k, rk, 1e-6);
}

PYVLM_KERNEL_TEST(merge_rows_copies_and_skips_invalid) {
  std::vector<float> dst(4 * 3, 0.f), src = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  const int64_t positions[3] = {2, 9, 0};  // 9 is out of range: skipped
  pyvlm::merge_rows(reinterpret_cast<char*>(dst.data()), 12, 4,
                    reinterpret_cast<const char*>(src.data()), 12, 12, positions, 0, 3);
  const std::vector<float> expected = {7, 8, 9, 0, 0, 0, 1, 2, 3, 0, 0, 0};
  EXPECT_TRUE(dst == expected);
}
