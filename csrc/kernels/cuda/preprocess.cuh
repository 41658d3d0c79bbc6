// CUDA image preprocessing: Pillow-exact resize passes, crop, normalise and
// the NCHW or Qwen2-VL patch layouts. Framework-free: the plan (built on the
// host by plan_preprocess, whose double-precision filter weights must not go
// through nvcc) arrives as device arrays; the passes are integer-exact.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../preprocess.h"
#include "common.cuh"

namespace pyvlm {
namespace cuda {

// The plan's arrays on the device.
struct DevicePreprocessPlan {
  const GroupPlan* groups;
  const EntryPlan* entries;
  const int64_t* group_row_start;  // [num_groups + 1]
  const int64_t* entry_row_start;  // [num_entries + 1]
  const uint8_t* const* images;    // per image, [h, w, 3]
  const float* lut;                // [3, 256]
  const int32_t* table;            // taps
  uint8_t* scratch;                // intermediates
  int32_t num_groups, num_entries;
};

struct CropLayout {};
struct PatchLayout {
  int64_t patch_size, temporal_patch_size, merge_size;
};

// Index i with start[i] <= row < start[i + 1] (start ascending, start[0] = 0).
__device__ __forceinline__ int32_t find_span(const int64_t* start, int32_t n, int64_t row) {
  int32_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) >> 1;
    if (start[mid] <= row) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kResampleBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Three channels of taps along x of an interleaved RGB row.
__device__ __forceinline__ void taps_along_row(const uint8_t* row, const int32_t* w, int32_t count,
                                               uint8_t rgb[3]) {
  int32_t a0 = 1 << (kResampleBits - 1), a1 = a0, a2 = a0;
  for (int32_t k = 0; k < count; ++k) {
    const int32_t wk = w[k];
    a0 += int32_t(row[3 * k]) * wk;
    a1 += int32_t(row[3 * k + 1]) * wk;
    a2 += int32_t(row[3 * k + 2]) * wk;
  }
  rgb[0] = clip8(a0), rgb[1] = clip8(a1), rgb[2] = clip8(a2);
}

// One byte of taps across rows spaced `stride` apart.
__device__ __forceinline__ uint8_t taps_across_rows(const uint8_t* src, int64_t stride,
                                                    const int32_t* w, int32_t count) {
  int32_t acc = 1 << (kResampleBits - 1);
  for (int32_t k = 0; k < count; ++k) acc += int32_t(src[k * stride]) * w[k];
  return clip8(acc);
}

// First pass: one block per intermediate row (all groups flattened).
__global__ void preprocess_first_pass_kernel(DevicePreprocessPlan p, int64_t total_rows) {
  for (int64_t row = blockIdx.x; row < total_rows; row += gridDim.x) {
    const int32_t gi = find_span(p.group_row_start, p.num_groups + 1, row);
    const GroupPlan& g = p.groups[gi];
    const int32_t i = static_cast<int32_t>(row - p.group_row_start[gi]);
    const uint8_t* image = p.images[g.source];
    const int64_t in_stride = int64_t(g.in_w) * 3, tmp_stride = int64_t(g.tmp_cols) * 3;
    uint8_t* tmp = p.scratch + g.tmp_offset + i * tmp_stride;
    if (g.horizontal_first) {
      const uint8_t* src = image + (g.tmp_row0 + i) * in_stride;
      const int32_t* cb = p.table + g.cols.bounds;
      for (int32_t j = threadIdx.x; j < g.tmp_cols; j += blockDim.x) {
        uint8_t rgb[3];
        taps_along_row(src + int64_t(cb[2 * j]) * 3, p.table + g.cols.coeffs + int64_t(j) * g.cols.ksize,
                       cb[2 * j + 1], rgb);
        tmp[3 * j] = rgb[0], tmp[3 * j + 1] = rgb[1], tmp[3 * j + 2] = rgb[2];
      }
    } else {
      const int32_t* rb = p.table + g.rows.bounds + 2 * i;
      const uint8_t* src = image + rb[0] * in_stride + int64_t(g.tmp_col0) * 3;
      const int32_t* w = p.table + g.rows.coeffs + int64_t(i) * g.rows.ksize;
      for (int64_t n = threadIdx.x; n < tmp_stride; n += blockDim.x)
        tmp[n] = taps_across_rows(src + n, in_stride, w, rb[1]);
    }
  }
}

// Resized pixel (region row i, region column j) from the intermediate.
__device__ __forceinline__ void second_pass_pixel(const DevicePreprocessPlan& p, const GroupPlan& g,
                                                  int32_t i, int32_t j, uint8_t rgb[3]) {
  const uint8_t* tmp = p.scratch + g.tmp_offset;
  const int64_t tmp_stride = int64_t(g.tmp_cols) * 3;
  if (g.horizontal_first) {
    const int32_t* rb = p.table + g.rows.bounds + 2 * i;
    const int32_t* w = p.table + g.rows.coeffs + int64_t(i) * g.rows.ksize;
    const uint8_t* src = tmp + (rb[0] - g.tmp_row0) * tmp_stride + int64_t(j) * 3;
    for (int c = 0; c < 3; ++c) rgb[c] = taps_across_rows(src + c, tmp_stride, w, rb[1]);
    return;
  }
  const int32_t* cb = p.table + g.cols.bounds + 2 * j;
  taps_along_row(tmp + i * tmp_stride + int64_t(cb[0] - g.tmp_col0) * 3,
                 p.table + g.cols.coeffs + int64_t(j) * g.cols.ksize, cb[1], rgb);
}

template <typename T>
__device__ __forceinline__ void store_pixel(const DevicePreprocessPlan& p, const EntryPlan& e,
                                            CropLayout, int32_t y, int32_t x, const uint8_t rgb[3],
                                            T* out) {
  const int64_t plane = int64_t(e.height) * e.width;
  T* o = out + e.out_offset + int64_t(y) * e.width + x;
  for (int c = 0; c < 3; ++c) o[c * plane] = from_float<T>(p.lut[c * 256 + rgb[c]]);
}

template <typename T>
__device__ __forceinline__ void store_pixel(const DevicePreprocessPlan& p, const EntryPlan& e,
                                            PatchLayout l, int32_t y, int32_t x, const uint8_t rgb[3],
                                            T* out) {
  const int64_t ps = l.patch_size, tp = l.temporal_patch_size, m = l.merge_size;
  const int64_t gy = y / ps, gx = x / ps, blocks_w = e.width / ps / m;
  const int64_t patch = ((gy / m * blocks_w + gx / m) * m + gy % m) * m + gx % m;
  T* o = out + e.out_offset + patch * 3 * tp * ps * ps + (y % ps) * ps + x % ps;
  for (int c = 0; c < 3; ++c) {
    const T v = from_float<T>(p.lut[c * 256 + rgb[c]]);
    for (int64_t t = 0; t < tp; ++t) o[(c * tp + t) * ps * ps] = v;
  }
}

// Second pass + window + normalise: one block per output row of an entry.
template <typename T, typename Layout>
__global__ void preprocess_entries_kernel(DevicePreprocessPlan p, int64_t total_rows, Layout layout,
                                          uint8_t fill_r, uint8_t fill_g, uint8_t fill_b, T* out) {
  for (int64_t row = blockIdx.x; row < total_rows; row += gridDim.x) {
    const int32_t ei = find_span(p.entry_row_start, p.num_entries + 1, row);
    const EntryPlan& e = p.entries[ei];
    const GroupPlan& g = p.groups[e.group];
    const int32_t y = static_cast<int32_t>(row - p.entry_row_start[ei]);
    const int32_t ry = e.top + y;
    for (int32_t x = threadIdx.x; x < e.width; x += blockDim.x) {
      const int32_t rx = e.left + x;
      uint8_t rgb[3] = {fill_r, fill_g, fill_b};
      if (ry >= 0 && ry < g.out_h && rx >= 0 && rx < g.out_w)
        second_pass_pixel(p, g, ry - g.region_top, rx - g.region_left, rgb);
      store_pixel(p, e, layout, y, x, rgb, out);
    }
  }
}

inline unsigned preprocess_grid(int64_t rows) {
  return static_cast<unsigned>(rows < (int64_t(1) << 30) ? rows : (int64_t(1) << 30));
}

inline void launch_preprocess_first_pass(const DevicePreprocessPlan& p, int64_t total_rows,
                                         cudaStream_t stream) {
  if (total_rows == 0) return;
  preprocess_first_pass_kernel<<<preprocess_grid(total_rows), 256, 0, stream>>>(p, total_rows);
}

template <typename T, typename Layout>
void launch_preprocess_entries(const DevicePreprocessPlan& p, int64_t total_rows, Layout layout,
                               const int64_t* fill, T* out, cudaStream_t stream) {
  if (total_rows == 0) return;
  preprocess_entries_kernel<T, Layout><<<preprocess_grid(total_rows), 256, 0, stream>>>(
      p, total_rows, layout, uint8_t(fill[0]), uint8_t(fill[1]), uint8_t(fill[2]), out);
}

}  // namespace cuda
}  // namespace pyvlm
