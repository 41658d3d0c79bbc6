// CPU adapters for the image preprocessing ops: plan, threads over groups
// (first pass) and entries (second pass + crop/patchify + normalise).
#include <ATen/Parallel.h>

#include "../validate/preprocess.h"
#include "dispatch.h"

namespace pyvlm {
namespace {

std::vector<const uint8_t*> image_pointers(at::TensorList images) {
  std::vector<const uint8_t*> ptrs;
  for (const at::Tensor& im : images) ptrs.push_back(im.const_data_ptr<uint8_t>());
  return ptrs;
}

// Runs the first pass of every group; returns the intermediate buffer.
std::vector<uint8_t> run_first_pass(const PreprocessPlan& plan, at::TensorList images) {
  const auto ptrs = image_pointers(images);
  std::vector<uint8_t> scratch(plan.scratch_bytes);
  at::parallel_for(0, int64_t(plan.groups.size()), 1, [&](int64_t begin, int64_t end) {
    preprocess_first_pass(plan, ptrs.data(), scratch.data(), begin, end);
  });
  return scratch;
}

void preprocess_images_cpu(at::Tensor& out, at::TensorList images,
                           c10::IntArrayRef source_index, c10::IntArrayRef resize_hw,
                           c10::IntArrayRef crop_tl, int64_t resample, double rescale_factor,
                           c10::ArrayRef<double> mean, c10::ArrayRef<double> std,
                           c10::IntArrayRef fill) {
  const Resample filter = check_resample(resample);
  const auto image_hw = check_images(images, out);
  const auto specs = check_preprocess_images(out, image_hw, source_index, resize_hw, crop_tl,
                                             mean, std, fill);
  if (out.numel() == 0) return;
  const PreprocessPlan plan = plan_preprocess(image_hw, specs, filter);
  const auto scratch = run_first_pass(plan, images);
  const auto lut = normalize_lut(rescale_factor, mean.data(), std.data());
  PYVLM_CPU_DISPATCH_FLOAT(out.scalar_type(), "preprocess_images", [&] {
    at::parallel_for(0, int64_t(plan.entries.size()), 1, [&](int64_t begin, int64_t end) {
      preprocess_crop_entries(plan, scratch.data(), lut.data(), fill.data(),
                              data_as<scalar_t>(out), begin, end);
    });
  });
}

void preprocess_images_patchify_cpu(at::Tensor& out, at::TensorList images,
                                    c10::IntArrayRef resize_hw, int64_t resample,
                                    double rescale_factor, c10::ArrayRef<double> mean,
                                    c10::ArrayRef<double> std, int64_t patch_size,
                                    int64_t temporal_patch_size, int64_t merge_size) {
  const Resample filter = check_resample(resample);
  const auto image_hw = check_images(images, out);
  const auto specs = check_preprocess_patchify(out, image_hw, resize_hw, mean, std, patch_size,
                                               temporal_patch_size, merge_size);
  if (out.numel() == 0) return;
  const PreprocessPlan plan = plan_preprocess(image_hw, specs, filter);
  const auto scratch = run_first_pass(plan, images);
  const auto lut = normalize_lut(rescale_factor, mean.data(), std.data());
  PYVLM_CPU_DISPATCH_FLOAT(out.scalar_type(), "preprocess_images_patchify", [&] {
    at::parallel_for(0, int64_t(plan.entries.size()), 1, [&](int64_t begin, int64_t end) {
      preprocess_patch_entries(plan, scratch.data(), lut.data(), patch_size,
                               temporal_patch_size, merge_size, data_as<scalar_t>(out), begin,
                               end);
    });
  });
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CPU, m) {
  m.impl("preprocess_images", &pyvlm::preprocess_images_cpu);
  m.impl("preprocess_images_patchify", &pyvlm::preprocess_images_patchify_cpu);
}
