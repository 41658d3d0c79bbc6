// Vision-tower preprocessing: Pillow-exact resize of uint8 RGB images, crop
// (with fill outside the image), rescale + normalise, and either the NCHW
// batch layout or Qwen2-VL's patch rows.
//
// Bit-exactness with PIL.Image.resize comes from reproducing Pillow's
// separable 8-bit resampler (libImaging/Resample.c): per-axis filter
// coefficients computed in double, normalised to sum 1, converted to fixed
// point with 22 fractional bits; each pass accumulates in int32 starting at
// one half, shifts right by 22 and clamps to [0, 255]; the horizontal pass
// runs first unless the height shrinks more than twice as much as the width.
// The coefficients are computed here on the host for both devices (nvcc's
// FMA contraction would change their double rounding); the integer passes
// are then exact everywhere.
//
// A plan describes a batch: a *group* is one (image, resize size) pair,
// resized once; an *entry* is one output window read from a group. Only the
// part of the resized image some window covers (the group's region) is
// computed. The first pass writes a uint8 intermediate per group into a
// scratch buffer; the second pass produces resized pixels on demand.
#pragma once
#include <cstdint>
#include <vector>

namespace pyvlm {

// PIL.Image.Resampling values.
enum class Resample : int { kNearest = 0, kBilinear = 2, kBicubic = 3 };

constexpr int kResampleBits = 22;  // Pillow's PRECISION_BITS (32 - 8 - 2)

// Where one axis's taps live in PreprocessPlan::table: for output index o of
// the region (o = 0 .. region length), table[bounds + 2*o] is the first input
// index, table[bounds + 2*o + 1] the tap count, and table[coeffs + o*ksize +
// k] the fixed-point weight of tap k.
struct AxisTaps {
  int64_t bounds;
  int64_t coeffs;
  int32_t ksize;
  int32_t pad_;
};

struct GroupPlan {
  int32_t source;                // index into the image list
  int32_t in_h, in_w;            // source image size
  int32_t out_h, out_w;          // resize size
  int32_t horizontal_first;      // Pillow's pass order
  int32_t region_top, region_left, region_h, region_w;  // computed part
  // The intermediate: horizontal first, it holds input rows [tmp_row0,
  // tmp_row0 + tmp_rows) x region columns; vertical first, region rows x
  // input columns [tmp_col0, tmp_col0 + tmp_cols).
  int32_t tmp_row0, tmp_col0, tmp_rows, tmp_cols;
  int64_t tmp_offset;  // byte offset of [tmp_rows, tmp_cols, 3] in scratch
  AxisTaps rows, cols;  // vertical (region rows) and horizontal (region cols)
};

struct EntryPlan {
  int32_t group;
  int32_t top, left;       // window top-left in the resized image (may be < 0)
  int32_t height, width;   // window size
  int32_t pad_;
  int64_t out_offset;      // element offset of the entry's output
};

struct PreprocessPlan {
  std::vector<GroupPlan> groups;
  std::vector<EntryPlan> entries;
  std::vector<int32_t> table;  // every axis's bounds and weights
  int64_t scratch_bytes = 0;
  // Prefix sums for flat work lists: first-pass rows per group, output rows
  // per entry (size + 1 each).
  std::vector<int64_t> group_row_start, entry_row_start;
};

// One requested output window.
struct EntrySpec {
  int64_t source, resize_h, resize_w, top, left, height, width, out_offset;
};

// Builds the plan (groups entries sharing source and resize size; computes
// regions, pass order and every axis's fixed-point taps). image_hw holds
// (h, w) per image. Inputs must already be validated.
PreprocessPlan plan_preprocess(const std::vector<int64_t>& image_hw,
                               const std::vector<EntrySpec>& entries,
                               Resample resample);

// lut[c * 256 + v] = float32((float32(v * rescale) - float32(mean[c])) /
// float32(std[c])), the arithmetic of transformers' rescale + normalize.
std::vector<float> normalize_lut(double rescale_factor, const double* mean,
                                 const double* std);

// First pass of groups [begin, end) into scratch. images[i] points at
// image i's [h, w, 3] bytes.
void preprocess_first_pass(const PreprocessPlan& plan,
                           const uint8_t* const* images, uint8_t* scratch,
                           int64_t begin, int64_t end);

// Entries [begin, end) written as [3, height, width] planes (the NCHW batch);
// T is float, half_t or bf16_t. fill holds one uint8 value per channel.
template <typename T>
void preprocess_crop_entries(const PreprocessPlan& plan,
                             const uint8_t* scratch, const float* lut,
                             const int64_t* fill, T* out, int64_t begin,
                             int64_t end);

// Entries [begin, end) (one per image, window = the whole resized image)
// written as Qwen2-VL patch rows of 3 * temporal_patch_size * p * p values.
template <typename T>
void preprocess_patch_entries(const PreprocessPlan& plan,
                              const uint8_t* scratch, const float* lut,
                              int64_t patch_size, int64_t temporal_patch_size,
                              int64_t merge_size, T* out, int64_t begin,
                              int64_t end);

}  // namespace pyvlm
