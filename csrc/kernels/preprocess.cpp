#include "preprocess.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <tuple>

#include "dtypes.h"

// The filter weights must round exactly as Pillow's C code does (no fused
// multiply-add), so contraction is switched off for this file.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace pyvlm {
namespace {

constexpr int32_t kOne = int32_t(1) << kResampleBits;
constexpr int32_t kHalf = int32_t(1) << (kResampleBits - 1);

// Pillow's bilinear (triangle) and bicubic (Keys, a = -0.5) kernels, with
// its evaluation order so the doubles round identically.
double bilinear_weight(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

double bicubic_weight(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

int32_t to_fixed(double w) {
  return w < 0 ? int32_t(-0.5 + w * kOne) : int32_t(0.5 + w * kOne);
}

struct Taps {
  int32_t ksize = 1;
  std::vector<int32_t> bounds;  // (first, count) per output
  std::vector<int32_t> weights;  // ksize per output
};

// An axis whose size does not change: Pillow skips that pass; one unit tap
// reproduces the input exactly.
Taps identity_taps(int64_t o0, int64_t o1) {
  Taps t;
  for (int64_t o = o0; o < o1; ++o) {
    t.bounds.insert(t.bounds.end(), {int32_t(o), 1});
    t.weights.push_back(kOne);
  }
  return t;
}

// Pillow's NEAREST resize (ImagingScaleAffine): the source coordinate
// starts at half a step and accumulates the step in double; coordinates
// outside the image leave the zero fill (no taps).
Taps nearest_taps(int64_t in_size, int64_t out_size, int64_t o0, int64_t o1) {
  Taps t;
  const double step = double(float(in_size)) / double(out_size);
  double pos = step * 0.5;
  for (int64_t o = 0; o < o1; ++o, pos += step) {
    if (o < o0) continue;
    const int64_t src = pos < 0.0 ? -1 : int64_t(pos);
    const bool inside = src >= 0 && src < in_size;
    t.bounds.insert(t.bounds.end(), {int32_t(inside ? src : 0), inside ? 1 : 0});
    t.weights.push_back(kOne);
  }
  return t;
}

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for outputs [o0, o1):
// the filter widens by the scale when downscaling, weights are normalised to
// sum 1 in double, then rounded half away from zero to fixed point.
Taps filter_taps(int64_t in_size, int64_t out_size, int64_t o0, int64_t o1,
                 Resample resample) {
  const bool cubic = resample == Resample::kBicubic;
  const double scale = double(float(in_size)) / double(out_size);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = (cubic ? 2.0 : 1.0) * filterscale;
  const double inv_filterscale = 1.0 / filterscale;
  Taps t;
  t.ksize = int32_t(std::ceil(support)) * 2 + 1;
  std::vector<double> w(t.ksize);
  for (int64_t o = o0; o < o1; ++o) {
    const double center = (double(o) + 0.5) * scale;
    const int64_t first = std::max<int64_t>(0, int64_t(center - support + 0.5));
    const int64_t last = std::min<int64_t>(in_size, int64_t(center + support + 0.5));
    const int64_t count = last - first;
    double sum = 0.0;
    for (int64_t k = 0; k < count; ++k) {
      const double x = (double(k + first) - center + 0.5) * inv_filterscale;
      w[k] = cubic ? bicubic_weight(x) : bilinear_weight(x);
      sum += w[k];
    }
    for (int64_t k = 0; k < t.ksize; ++k) {
      const double v = k < count ? (sum != 0.0 ? w[k] / sum : w[k]) : 0.0;
      t.weights.push_back(to_fixed(v));
    }
    t.bounds.insert(t.bounds.end(), {int32_t(first), int32_t(count)});
  }
  return t;
}

Taps axis_taps(int64_t in_size, int64_t out_size, int64_t o0, int64_t o1,
               Resample resample) {
  if (in_size == out_size) return identity_taps(o0, o1);
  if (resample == Resample::kNearest) return nearest_taps(in_size, out_size, o0, o1);
  return filter_taps(in_size, out_size, o0, o1, resample);
}

AxisTaps append_taps(std::vector<int32_t>& table, const Taps& t) {
  AxisTaps a{};
  a.ksize = t.ksize;
  a.bounds = int64_t(table.size());
  table.insert(table.end(), t.bounds.begin(), t.bounds.end());
  a.coeffs = int64_t(table.size());
  table.insert(table.end(), t.weights.begin(), t.weights.end());
  return a;
}

// [lo, hi) of the input indices the taps read (lo == hi when none).
std::pair<int32_t, int32_t> taps_span(const Taps& t) {
  int32_t lo = INT32_MAX, hi = 0;
  for (size_t o = 0; o < t.bounds.size(); o += 2) {
    if (t.bounds[o + 1] == 0) continue;
    lo = std::min(lo, t.bounds[o]);
    hi = std::max(hi, t.bounds[o] + t.bounds[o + 1]);
  }
  return lo < hi ? std::make_pair(lo, hi) : std::make_pair(0, 0);
}

// Pillow runs the vertical pass first only when the height shrinks by more
// than twice as many pixels as the width (ImagingResampleInner).
bool pillow_horizontal_first(const GroupPlan& g) {
  const int64_t dh = int64_t(g.in_h) - g.out_h, dw = int64_t(g.in_w) - g.out_w;
  return !(dh > 0 && dh > dw * 2);
}

// Union of the windows clipped to the resized image, per group.
void grow_region(GroupPlan& g, const EntrySpec& e) {
  const int64_t t = std::max<int64_t>(e.top, 0), l = std::max<int64_t>(e.left, 0);
  const int64_t b = std::min<int64_t>(e.top + e.height, g.out_h);
  const int64_t r = std::min<int64_t>(e.left + e.width, g.out_w);
  if (t >= b || l >= r) return;
  if (g.region_h == 0) {
    g.region_top = int32_t(t), g.region_left = int32_t(l);
    g.region_h = int32_t(b - t), g.region_w = int32_t(r - l);
    return;
  }
  const int64_t t0 = std::min<int64_t>(t, g.region_top);
  const int64_t l0 = std::min<int64_t>(l, g.region_left);
  const int64_t b0 = std::max<int64_t>(b, g.region_top + g.region_h);
  const int64_t r0 = std::max<int64_t>(r, g.region_left + g.region_w);
  g.region_top = int32_t(t0), g.region_left = int32_t(l0);
  g.region_h = int32_t(b0 - t0), g.region_w = int32_t(r0 - l0);
}

// Computes the group's taps and intermediate shape once its region is known.
void finish_group(GroupPlan& g, Resample resample, std::vector<int32_t>& table,
                  int64_t& scratch_bytes) {
  const Taps rows = axis_taps(g.in_h, g.out_h, g.region_top, g.region_top + g.region_h, resample);
  const Taps cols = axis_taps(g.in_w, g.out_w, g.region_left, g.region_left + g.region_w, resample);
  g.horizontal_first = pillow_horizontal_first(g) ? 1 : 0;
  if (g.horizontal_first) {
    const auto [lo, hi] = taps_span(rows);
    g.tmp_row0 = lo, g.tmp_rows = hi - lo, g.tmp_col0 = 0, g.tmp_cols = g.region_w;
  } else {
    const auto [lo, hi] = taps_span(cols);
    g.tmp_row0 = 0, g.tmp_rows = g.region_h, g.tmp_col0 = lo, g.tmp_cols = hi - lo;
  }
  g.rows = append_taps(table, rows);
  g.cols = append_taps(table, cols);
  g.tmp_offset = scratch_bytes;
  scratch_bytes += (int64_t(g.tmp_rows) * g.tmp_cols * 3 + 15) / 16 * 16;
}

inline uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kResampleBits;
  return uint8_t(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// One output pixel's taps along x of an interleaved RGB row.
inline void taps_along_row(const uint8_t* row, const int32_t* w, int32_t count,
                           uint8_t* dst) {
  int32_t a0 = kHalf, a1 = kHalf, a2 = kHalf;
  for (int32_t k = 0; k < count; ++k) {
    a0 += int32_t(row[3 * k]) * w[k];
    a1 += int32_t(row[3 * k + 1]) * w[k];
    a2 += int32_t(row[3 * k + 2]) * w[k];
  }
  dst[0] = clip8(a0), dst[1] = clip8(a1), dst[2] = clip8(a2);
}

// n bytes of a weighted sum of rows spaced `stride` apart (vectorizes).
inline void taps_across_rows(const uint8_t* src, int64_t stride, const int32_t* w,
                             int32_t count, int64_t n, int32_t* acc, uint8_t* dst) {
  for (int64_t i = 0; i < n; ++i) acc[i] = kHalf;
  for (int32_t k = 0; k < count; ++k) {
    const uint8_t* s = src + k * stride;
    const int32_t wk = w[k];
    for (int64_t i = 0; i < n; ++i) acc[i] += int32_t(s[i]) * wk;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = clip8(acc[i]);
}

void first_pass_group(const GroupPlan& g, const int32_t* table, const uint8_t* image,
                      uint8_t* tmp) {
  const int64_t in_stride = int64_t(g.in_w) * 3, tmp_stride = int64_t(g.tmp_cols) * 3;
  const int32_t* cb = table + g.cols.bounds;
  const int32_t* cw = table + g.cols.coeffs;
  const int32_t* rb = table + g.rows.bounds;
  const int32_t* rw = table + g.rows.coeffs;
  if (g.horizontal_first) {
    for (int32_t i = 0; i < g.tmp_rows; ++i) {
      const uint8_t* row = image + (g.tmp_row0 + i) * in_stride;
      for (int32_t j = 0; j < g.tmp_cols; ++j)
        taps_along_row(row + int64_t(cb[2 * j]) * 3, cw + int64_t(j) * g.cols.ksize,
                       cb[2 * j + 1], tmp + i * tmp_stride + j * 3);
    }
    return;
  }
  std::vector<int32_t> acc(tmp_stride);
  for (int32_t i = 0; i < g.tmp_rows; ++i)
    taps_across_rows(image + rb[2 * i] * in_stride + int64_t(g.tmp_col0) * 3, in_stride,
                     rw + int64_t(i) * g.rows.ksize, rb[2 * i + 1], tmp_stride, acc.data(),
                     tmp + i * tmp_stride);
}

// Resized pixels of region row i, region columns [j0, j1), into dst (RGB).
void second_pass_row(const GroupPlan& g, const int32_t* table, const uint8_t* tmp,
                     int32_t i, int32_t j0, int32_t j1, int32_t* acc, uint8_t* dst) {
  const int64_t tmp_stride = int64_t(g.tmp_cols) * 3;
  if (g.horizontal_first) {
    const int32_t* rb = table + g.rows.bounds + 2 * i;
    taps_across_rows(tmp + (rb[0] - g.tmp_row0) * tmp_stride + int64_t(j0) * 3, tmp_stride,
                     table + g.rows.coeffs + int64_t(i) * g.rows.ksize, rb[1],
                     int64_t(j1 - j0) * 3, acc, dst);
    return;
  }
  const uint8_t* row = tmp + i * tmp_stride;
  const int32_t* cb = table + g.cols.bounds;
  for (int32_t j = j0; j < j1; ++j)
    taps_along_row(row + int64_t(cb[2 * j] - g.tmp_col0) * 3,
                   table + g.cols.coeffs + int64_t(j) * g.cols.ksize, cb[2 * j + 1],
                   dst + int64_t(j - j0) * 3);
}

template <typename T>
void fill_span(T* dst, int64_t n, T value) {
  for (int64_t i = 0; i < n; ++i) dst[i] = value;
}

// One output row of a crop entry: resized pixels where the window overlaps
// the image, the fill colour elsewhere.
template <typename T>
void crop_row(const PreprocessPlan& plan, const EntryPlan& e, const uint8_t* scratch,
              const float* lut, const T* fill, int32_t y, std::vector<int32_t>& acc,
              std::vector<uint8_t>& rgb, T* out) {
  const GroupPlan& g = plan.groups[e.group];
  const int64_t plane = int64_t(e.height) * e.width;
  const int64_t ry = int64_t(e.top) + y;
  const int64_t x0 = std::clamp<int64_t>(-int64_t(e.left), 0, e.width);
  const int64_t x1 = std::clamp<int64_t>(int64_t(g.out_w) - e.left, x0, e.width);
  const bool row_inside = ry >= 0 && ry < g.out_h && x1 > x0;
  for (int c = 0; c < 3; ++c) {
    T* o = out + c * plane + int64_t(y) * e.width;
    if (!row_inside) {
      fill_span(o, e.width, fill[c]);
      continue;
    }
    fill_span(o, x0, fill[c]);
    fill_span(o + x1, e.width - x1, fill[c]);
  }
  if (!row_inside) return;
  const int32_t j0 = int32_t(e.left + x0 - g.region_left);
  const int32_t j1 = int32_t(e.left + x1 - g.region_left);
  second_pass_row(g, plan.table.data(), scratch + g.tmp_offset, int32_t(ry - g.region_top), j0,
                  j1, acc.data(), rgb.data());
  for (int c = 0; c < 3; ++c) {
    T* o = out + c * plane + int64_t(y) * e.width;
    const float* l = lut + c * 256;
    for (int64_t x = x0; x < x1; ++x) o[x] = from_float<T>(l[rgb[(x - x0) * 3 + c]]);
  }
}

}  // namespace

PreprocessPlan plan_preprocess(const std::vector<int64_t>& image_hw,
                               const std::vector<EntrySpec>& entries, Resample resample) {
  PreprocessPlan plan;
  std::map<std::tuple<int64_t, int64_t, int64_t>, int32_t> group_of;
  for (const EntrySpec& s : entries) {
    const auto key = std::make_tuple(s.source, s.resize_h, s.resize_w);
    auto it = group_of.find(key);
    if (it == group_of.end()) {
      GroupPlan g{};
      g.source = int32_t(s.source);
      g.in_h = int32_t(image_hw[2 * s.source]), g.in_w = int32_t(image_hw[2 * s.source + 1]);
      g.out_h = int32_t(s.resize_h), g.out_w = int32_t(s.resize_w);
      it = group_of.emplace(key, int32_t(plan.groups.size())).first;
      plan.groups.push_back(g);
    }
    grow_region(plan.groups[it->second], s);
    EntryPlan e{};
    e.group = it->second;
    e.top = int32_t(s.top), e.left = int32_t(s.left);
    e.height = int32_t(s.height), e.width = int32_t(s.width);
    e.out_offset = s.out_offset;
    plan.entries.push_back(e);
  }
  plan.group_row_start.push_back(0);
  for (GroupPlan& g : plan.groups) {
    finish_group(g, resample, plan.table, plan.scratch_bytes);
    plan.group_row_start.push_back(plan.group_row_start.back() + g.tmp_rows);
  }
  plan.entry_row_start.push_back(0);
  for (const EntryPlan& e : plan.entries)
    plan.entry_row_start.push_back(plan.entry_row_start.back() + e.height);
  return plan;
}

std::vector<float> normalize_lut(double rescale_factor, const double* mean, const double* std) {
  std::vector<float> lut(3 * 256);
  for (int c = 0; c < 3; ++c) {
    const float m = float(mean[c]), s = float(std[c]);
    for (int v = 0; v < 256; ++v) {
      const float scaled = float(double(v) * rescale_factor);
      lut[c * 256 + v] = (scaled - m) / s;
    }
  }
  return lut;
}

void preprocess_first_pass(const PreprocessPlan& plan, const uint8_t* const* images,
                           uint8_t* scratch, int64_t begin, int64_t end) {
  for (int64_t gi = begin; gi < end; ++gi) {
    const GroupPlan& g = plan.groups[gi];
    if (g.tmp_rows == 0 || g.tmp_cols == 0) continue;
    first_pass_group(g, plan.table.data(), images[g.source], scratch + g.tmp_offset);
  }
}

template <typename T>
void preprocess_crop_entries(const PreprocessPlan& plan, const uint8_t* scratch,
                             const float* lut, const int64_t* fill, T* out, int64_t begin,
                             int64_t end) {
  const T fill_values[3] = {from_float<T>(lut[fill[0]]), from_float<T>(lut[256 + fill[1]]),
                            from_float<T>(lut[512 + fill[2]])};
  std::vector<int32_t> acc;
  std::vector<uint8_t> rgb;
  for (int64_t ei = begin; ei < end; ++ei) {
    const EntryPlan& e = plan.entries[ei];
    acc.resize(int64_t(e.width) * 3);
    rgb.resize(int64_t(e.width) * 3);
    for (int32_t y = 0; y < e.height; ++y)
      crop_row(plan, e, scratch, lut, fill_values, y, acc, rgb, out + e.out_offset);
  }
}

template <typename T>
void preprocess_patch_entries(const PreprocessPlan& plan, const uint8_t* scratch,
                              const float* lut, int64_t patch_size,
                              int64_t temporal_patch_size, int64_t merge_size, T* out,
                              int64_t begin, int64_t end) {
  const int64_t p = patch_size, tp = temporal_patch_size, m = merge_size;
  const int64_t row_len = 3 * tp * p * p;
  std::vector<int32_t> acc;
  std::vector<uint8_t> rgb;
  std::vector<T> values(3 * p);
  for (int64_t ei = begin; ei < end; ++ei) {
    const EntryPlan& e = plan.entries[ei];
    const GroupPlan& g = plan.groups[e.group];
    const int64_t grid_w = e.width / p, blocks_w = grid_w / m;
    acc.resize(int64_t(e.width) * 3);
    rgb.resize(int64_t(e.width) * 3);
    for (int32_t y = 0; y < e.height; ++y) {
      second_pass_row(g, plan.table.data(), scratch + g.tmp_offset, y, 0, e.width, acc.data(),
                      rgb.data());
      const int64_t gy = y / p, py = y % p;
      // Each patch column takes p consecutive pixels of this row: normalise
      // them per channel, then copy the run into every frame.
      for (int64_t gx = 0; gx < grid_w; ++gx) {
        const int64_t patch = ((gy / m * blocks_w + gx / m) * m + gy % m) * m + gx % m;
        const uint8_t* px = rgb.data() + gx * p * 3;
        for (int c = 0; c < 3; ++c)
          for (int64_t i = 0; i < p; ++i) values[c * p + i] = from_float<T>(lut[c * 256 + px[i * 3 + c]]);
        T* dst = out + e.out_offset + patch * row_len + py * p;
        for (int64_t c = 0; c < 3; ++c)
          for (int64_t t = 0; t < tp; ++t)
            std::copy(values.begin() + c * p, values.begin() + (c + 1) * p, dst + (c * tp + t) * p * p);
      }
    }
  }
}

#define PYVLM_INSTANTIATE_PREPROCESS(T)                                                     \
  template void preprocess_crop_entries<T>(const PreprocessPlan&, const uint8_t*,          \
                                           const float*, const int64_t*, T*, int64_t,      \
                                           int64_t);                                       \
  template void preprocess_patch_entries<T>(const PreprocessPlan&, const uint8_t*,         \
                                            const float*, int64_t, int64_t, int64_t, T*,   \
                                            int64_t, int64_t);
PYVLM_INSTANTIATE_PREPROCESS(float)
PYVLM_INSTANTIATE_PREPROCESS(half_t)
PYVLM_INSTANTIATE_PREPROCESS(bf16_t)
#undef PYVLM_INSTANTIATE_PREPROCESS

}  // namespace pyvlm
