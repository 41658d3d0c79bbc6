// Image preprocessing against naive loops: a double-precision separable
// resampler (the fixed-point kernel may differ by a rounding step per pass),
// exact crops with fill, and the Qwen2-VL patch order.
#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "../kernels/preprocess.h"
#include "harness.h"

namespace {

std::vector<uint8_t> random_image(int64_t h, int64_t w) {
  std::vector<uint8_t> im(h * w * 3);
  for (auto& v : im) v = uint8_t(pyvlm_test::rng()() & 255);
  return im;
}

double cubic(double x) {
  x = std::fabs(x);
  if (x < 1) return (1.5 * x - 2.5) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * -0.5;
  return 0;
}

// One pass along an axis of length n (stride between samples `step`) in double.
std::vector<double> naive_pass(const std::vector<double>& src, int64_t n, int64_t out_n,
                               int64_t lines, int64_t step, int64_t line_step) {
  const double scale = double(n) / out_n, fs = std::max(scale, 1.0), support = 2 * fs;
  std::vector<double> dst(out_n * lines);
  for (int64_t o = 0; o < out_n; ++o) {
    const double center = (o + 0.5) * scale;
    const int64_t lo = std::max<int64_t>(0, int64_t(center - support + 0.5));
    const int64_t hi = std::min<int64_t>(n, int64_t(center + support + 0.5));
    double sum = 0;
    for (int64_t x = lo; x < hi; ++x) sum += cubic((x - center + 0.5) / fs);
    for (int64_t l = 0; l < lines; ++l) {
      double acc = 0;
      for (int64_t x = lo; x < hi; ++x)
        acc += src[x * step + l * line_step] * cubic((x - center + 0.5) / fs) / sum;
      dst[o * step + l * line_step] = std::clamp(std::round(acc), 0.0, 255.0);
    }
  }
  return dst;
}

struct Run {
  pyvlm::PreprocessPlan plan;
  std::vector<uint8_t> scratch;
  std::vector<float> lut;
};

Run prepare(const std::vector<uint8_t>& image, int64_t h, int64_t w,
            const std::vector<pyvlm::EntrySpec>& specs, double rescale) {
  Run r;
  r.plan = pyvlm::plan_preprocess({h, w}, specs, pyvlm::Resample::kBicubic);
  r.scratch.resize(r.plan.scratch_bytes);
  const uint8_t* ptr = image.data();
  pyvlm::preprocess_first_pass(r.plan, &ptr, r.scratch.data(), 0, int64_t(r.plan.groups.size()));
  const double mean[3] = {0, 0, 0}, std[3] = {1, 1, 1};
  r.lut = pyvlm::normalize_lut(rescale, mean, std);
  return r;
}

}  // namespace

PYVLM_KERNEL_TEST(preprocess_bicubic_resize_near_naive) {
  const int64_t h = 13, w = 29, oh = 17, ow = 11;
  const auto image = random_image(h, w);
  Run r = prepare(image, h, w, {{0, oh, ow, 0, 0, oh, ow, 0}}, 1.0);
  std::vector<float> out(3 * oh * ow, NAN);
  const int64_t fill[3] = {0, 0, 0};
  pyvlm::preprocess_crop_entries(r.plan, r.scratch.data(), r.lut.data(), fill, out.data(), 0, 1);
  // Horizontal pass first, as Pillow does when the height does not shrink.
  std::vector<double> src(image.begin(), image.end());
  std::vector<double> mid(h * ow * 3);
  for (int64_t y = 0; y < h; ++y) {
    std::vector<double> line(src.begin() + y * w * 3, src.begin() + (y + 1) * w * 3);
    auto res = naive_pass(line, w, ow, 3, 3, 1);
    std::copy(res.begin(), res.end(), mid.begin() + y * ow * 3);
  }
  const auto ref = naive_pass(mid, h, oh, ow * 3, ow * 3, 1);
  double max_diff = 0;
  for (int64_t y = 0; y < oh; ++y)
    for (int64_t x = 0; x < ow; ++x)
      for (int c = 0; c < 3; ++c)
        max_diff = std::max(max_diff, std::fabs(out[c * oh * ow + y * ow + x] - ref[(y * ow + x) * 3 + c]));
  EXPECT_TRUE(max_diff <= 2);
}

PYVLM_KERNEL_TEST(preprocess_crop_with_fill_is_exact) {
  const int64_t h = 6, w = 5, H = 4, W = 4;
  const auto image = random_image(h, w);
  // Same size (no resampling), window hanging off the top-left corner.
  Run r = prepare(image, h, w, {{0, h, w, -1, -2, H, W, 0}}, 1.0 / 255);
  std::vector<float> out(3 * H * W, NAN);
  const int64_t fill[3] = {10, 20, 30};
  pyvlm::preprocess_crop_entries(r.plan, r.scratch.data(), r.lut.data(), fill, out.data(), 0, 1);
  std::vector<double> ref(3 * H * W);
  for (int c = 0; c < 3; ++c)
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x) {
        const int64_t sy = y - 1, sx = x - 2;
        const bool inside = sy >= 0 && sy < h && sx >= 0 && sx < w;
        const double v = inside ? image[(sy * w + sx) * 3 + c] : double(fill[c]);
        ref[c * H * W + y * W + x] = v / 255;
      }
  EXPECT_NEAR_REL(out, ref, 1e-6);
}

PYVLM_KERNEL_TEST(preprocess_patch_order) {
  const int64_t p = 2, tp = 2, m = 2, h = 4, w = 8;
  const auto image = random_image(h, w);
  Run r = prepare(image, h, w, {{0, h, w, 0, 0, h, w, 0}}, 1.0);
  const int64_t row_len = 3 * tp * p * p, rows = (h / p) * (w / p);
  std::vector<float> out(rows * row_len, NAN);
  pyvlm::preprocess_patch_entries(r.plan, r.scratch.data(), r.lut.data(), p, tp, m, out.data(), 0, 1);
  // Rows walk merge blocks, then the m x m patches inside, row-major.
  std::vector<double> ref(rows * row_len);
  int64_t row = 0;
  for (int64_t bh = 0; bh < h / p / m; ++bh)
    for (int64_t bw = 0; bw < w / p / m; ++bw)
      for (int64_t mh = 0; mh < m; ++mh)
        for (int64_t mw = 0; mw < m; ++mw, ++row)
          for (int c = 0; c < 3; ++c)
            for (int64_t t = 0; t < tp; ++t)
              for (int64_t py = 0; py < p; ++py)
                for (int64_t px = 0; px < p; ++px) {
                  const int64_t y = (bh * m + mh) * p + py, x = (bw * m + mw) * p + px;
                  ref[row * row_len + ((c * tp + t) * p + py) * p + px] = image[(y * w + x) * 3 + c];
                }
  EXPECT_NEAR_REL(out, ref, 1e-7);
}
