// Argument checks for the image preprocessing ops, shared by the CPU and
// CUDA adapters. Every index and size arrives as a host list, so the checks
// here cover everything the kernels read; they also turn the arguments into
// the framework-free plan inputs.
#pragma once
#include <string>
#include <vector>

#include "../checks.h"
#include "../kernels/preprocess.h"

namespace pyvlm {

// Sizes up to 2^24 keep every index and product of the plan in range.
constexpr int64_t kMaxImageSide = int64_t(1) << 24;

inline Resample check_resample(int64_t resample) {
  TORCH_CHECK_VALUE(resample == 0 || resample == 2 || resample == 3,
                    "resample must be 0 (NEAREST), 2 (BILINEAR) or 3 (BICUBIC), got ",
                    resample);
  return static_cast<Resample>(resample);
}

// Returns (h, w) per image.
inline std::vector<int64_t> check_images(at::TensorList images, const at::Tensor& out) {
  std::vector<int64_t> hw;
  for (size_t i = 0; i < images.size(); ++i) {
    const at::Tensor& im = images[i];
    const std::string name = "images[" + std::to_string(i) + "]";
    TORCH_CHECK_VALUE(im.scalar_type() == at::kByte, name, " must have dtype uint8, got ",
                      im.scalar_type());
    TORCH_CHECK_VALUE(im.dim() == 3 && im.size(2) == 3, name,
                      " must have shape [h, w, 3] (RGB), got ", im.sizes());
    TORCH_CHECK_VALUE(im.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK_VALUE(im.device() == out.device(), name, " must be on ", out.device(),
                      ", got ", im.device());
    TORCH_CHECK_VALUE(im.size(0) >= 1 && im.size(1) >= 1 && im.size(0) < kMaxImageSide &&
                          im.size(1) < kMaxImageSide,
                      name, " must have sides in [1, 2^24), got ", im.sizes());
    hw.push_back(im.size(0));
    hw.push_back(im.size(1));
  }
  return hw;
}

inline void check_resize_hw(c10::IntArrayRef resize_hw, int64_t count) {
  TORCH_CHECK_VALUE(int64_t(resize_hw.size()) == 2 * count, "resize_hw must hold ", 2 * count,
                    " values (h, w per entry), got ", resize_hw.size());
  for (int64_t v : resize_hw)
    TORCH_CHECK_VALUE(v >= 1 && v < kMaxImageSide, "resize_hw values must be in [1, 2^24), got ",
                      v);
}

inline void check_normalization(c10::ArrayRef<double> mean, c10::ArrayRef<double> std) {
  TORCH_CHECK_VALUE(mean.size() == 3, "mean must hold 3 values, got ", mean.size());
  TORCH_CHECK_VALUE(std.size() == 3, "std must hold 3 values, got ", std.size());
}

// Checks preprocess_images' arguments and returns the plan's inputs.
inline std::vector<EntrySpec> check_preprocess_images(
    const at::Tensor& out, const std::vector<int64_t>& image_hw, c10::IntArrayRef source_index,
    c10::IntArrayRef resize_hw, c10::IntArrayRef crop_tl, c10::ArrayRef<double> mean,
    c10::ArrayRef<double> std, c10::IntArrayRef fill) {
  check_float_dtype(out, "out");
  check_contiguous(out, "out");
  TORCH_CHECK_VALUE(out.dim() == 4 && out.size(1) == 3,
                    "out must have shape [num_entries, 3, H, W], got ", out.sizes());
  const int64_t num_entries = out.size(0), height = out.size(2), width = out.size(3);
  TORCH_CHECK_VALUE(height < kMaxImageSide && width < kMaxImageSide,
                    "out's H and W must be below 2^24, got ", out.sizes());
  TORCH_CHECK_VALUE(int64_t(source_index.size()) == num_entries, "source_index must hold ",
                    num_entries, " values (out.size(0)), got ", source_index.size());
  const int64_t num_images = int64_t(image_hw.size()) / 2;
  for (int64_t s : source_index)
    TORCH_CHECK_INDEX(s >= 0 && s < num_images, "source_index values must be in [0, ",
                      num_images, "), got ", s);
  check_resize_hw(resize_hw, num_entries);
  TORCH_CHECK_VALUE(int64_t(crop_tl.size()) == 2 * num_entries, "crop_tl must hold ",
                    2 * num_entries, " values (top, left per entry), got ", crop_tl.size());
  for (int64_t v : crop_tl)
    TORCH_CHECK_VALUE(v > -kMaxImageSide && v < kMaxImageSide,
                      "crop_tl values must be in (-2^24, 2^24), got ", v);
  check_normalization(mean, std);
  TORCH_CHECK_VALUE(fill.size() == 3, "fill must hold 3 values, got ", fill.size());
  for (int64_t v : fill)
    TORCH_CHECK_VALUE(v >= 0 && v <= 255, "fill values must be in [0, 255], got ", v);
  std::vector<EntrySpec> entries;
  for (int64_t j = 0; j < num_entries; ++j)
    entries.push_back({source_index[j], resize_hw[2 * j], resize_hw[2 * j + 1], crop_tl[2 * j],
                       crop_tl[2 * j + 1], height, width, j * 3 * height * width});
  return entries;
}

// Checks preprocess_images_patchify's arguments and returns the plan's
// inputs (one entry per image, its window the whole resized image).
inline std::vector<EntrySpec> check_preprocess_patchify(
    const at::Tensor& out, const std::vector<int64_t>& image_hw, c10::IntArrayRef resize_hw,
    c10::ArrayRef<double> mean, c10::ArrayRef<double> std, int64_t patch_size,
    int64_t temporal_patch_size, int64_t merge_size) {
  check_float_dtype(out, "out");
  check_contiguous(out, "out");
  TORCH_CHECK_VALUE(patch_size >= 1 && patch_size <= 4096, "patch_size must be in [1, 4096], got ",
                    patch_size);
  TORCH_CHECK_VALUE(temporal_patch_size >= 1 && temporal_patch_size <= 64,
                    "temporal_patch_size must be in [1, 64], got ", temporal_patch_size);
  TORCH_CHECK_VALUE(merge_size >= 1 && merge_size <= 64, "merge_size must be in [1, 64], got ",
                    merge_size);
  const int64_t num_images = int64_t(image_hw.size()) / 2;
  check_resize_hw(resize_hw, num_images);
  check_normalization(mean, std);
  const int64_t factor = patch_size * merge_size;
  const int64_t row_len = 3 * temporal_patch_size * patch_size * patch_size;
  std::vector<EntrySpec> entries;
  int64_t num_patches = 0;
  for (int64_t i = 0; i < num_images; ++i) {
    const int64_t h = resize_hw[2 * i], w = resize_hw[2 * i + 1];
    TORCH_CHECK_VALUE(h % factor == 0 && w % factor == 0,
                      "resize_hw values must be multiples of patch_size * merge_size (", factor,
                      "), got (", h, ", ", w, ") for image ", i);
    entries.push_back({i, h, w, 0, 0, h, w, num_patches * row_len});
    num_patches += (h / patch_size) * (w / patch_size);
  }
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == num_patches && out.size(1) == row_len,
                    "out must have shape [", num_patches, ", ", row_len, "], got ", out.sizes());
  return entries;
}

}  // namespace pyvlm
