// CUDA adapters for the image preprocessing ops: the host builds the plan
// (filter weights in double, as Pillow does), uploads it in one pinned
// non-blocking copy, then two launches run both resize passes, the window,
// the normalisation and the layout.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>

#include "../kernels/cuda/preprocess.cuh"
#include "../validate/preprocess.h"
#include "dispatch.cuh"

namespace pyvlm {
namespace {

// Byte layout of the uploaded plan: each array 16-byte aligned.
struct PlanLayout {
  int64_t groups, entries, group_rows, entry_rows, images, lut, table, bytes;
};

int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

PlanLayout layout_of(const PreprocessPlan& plan, int64_t num_images) {
  PlanLayout l{};
  int64_t at = 0;
  auto take = [&](int64_t n) { const int64_t start = at; at = align16(at + n); return start; };
  l.groups = take(int64_t(plan.groups.size() * sizeof(GroupPlan)));
  l.entries = take(int64_t(plan.entries.size() * sizeof(EntryPlan)));
  l.group_rows = take(int64_t(plan.group_row_start.size() * sizeof(int64_t)));
  l.entry_rows = take(int64_t(plan.entry_row_start.size() * sizeof(int64_t)));
  l.images = take(num_images * int64_t(sizeof(const uint8_t*)));
  l.lut = take(3 * 256 * int64_t(sizeof(float)));
  l.table = take(int64_t(plan.table.size() * sizeof(int32_t)));
  l.bytes = at;
  return l;
}

template <typename V>
void put(uint8_t* base, int64_t offset, const V& values) {
  if (!values.empty()) std::memcpy(base + offset, values.data(), values.size() * sizeof(values[0]));
}

// The plan on the device. `keep` holds the device buffers alive (the launches
// are stream-ordered, so releasing them afterwards is safe with the caching
// allocator).
cuda::DevicePreprocessPlan upload_plan(const PreprocessPlan& plan, at::TensorList images,
                                       const std::vector<float>& lut, const at::Device& device,
                                       std::vector<at::Tensor>& keep) {
  const PlanLayout l = layout_of(plan, int64_t(images.size()));
  at::Tensor host = at::empty({l.bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.data_ptr<uint8_t>();
  std::vector<const uint8_t*> ptrs;
  for (const at::Tensor& im : images) ptrs.push_back(im.const_data_ptr<uint8_t>());
  put(h, l.groups, plan.groups);
  put(h, l.entries, plan.entries);
  put(h, l.group_rows, plan.group_row_start);
  put(h, l.entry_rows, plan.entry_row_start);
  put(h, l.images, ptrs);
  put(h, l.lut, lut);
  put(h, l.table, plan.table);
  at::Tensor dev = at::empty({l.bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  dev.copy_(host, /*non_blocking=*/true);  // the host allocator waits for the copy
  at::Tensor scratch =
      at::empty({std::max<int64_t>(plan.scratch_bytes, 1)}, at::TensorOptions().dtype(at::kByte).device(device));
  keep = {dev, scratch};
  uint8_t* d = dev.data_ptr<uint8_t>();
  cuda::DevicePreprocessPlan p{};
  p.groups = reinterpret_cast<const GroupPlan*>(d + l.groups);
  p.entries = reinterpret_cast<const EntryPlan*>(d + l.entries);
  p.group_row_start = reinterpret_cast<const int64_t*>(d + l.group_rows);
  p.entry_row_start = reinterpret_cast<const int64_t*>(d + l.entry_rows);
  p.images = reinterpret_cast<const uint8_t* const*>(d + l.images);
  p.lut = reinterpret_cast<const float*>(d + l.lut);
  p.table = reinterpret_cast<const int32_t*>(d + l.table);
  p.scratch = scratch.data_ptr<uint8_t>();
  p.num_groups = int32_t(plan.groups.size());
  p.num_entries = int32_t(plan.entries.size());
  return p;
}

template <typename Layout>
void run_preprocess(at::Tensor& out, at::TensorList images, const std::vector<int64_t>& image_hw,
                    const std::vector<EntrySpec>& specs, Resample filter, double rescale_factor,
                    c10::ArrayRef<double> mean, c10::ArrayRef<double> std, const int64_t* fill,
                    Layout layout, const char* name) {
  if (out.numel() == 0) return;
  const PreprocessPlan plan = plan_preprocess(image_hw, specs, filter);
  const auto lut = normalize_lut(rescale_factor, mean.data(), std.data());
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> keep;
  const cuda::DevicePreprocessPlan p = upload_plan(plan, images, lut, out.device(), keep);
  cuda::launch_preprocess_first_pass(p, plan.group_row_start.back(), stream);
  PYVLM_CHECK_LAUNCH(name);
  PYVLM_CUDA_DISPATCH_FLOAT(out.scalar_type(), name, [&] {
    cuda::launch_preprocess_entries(p, plan.entry_row_start.back(), layout, fill,
                                    cuda_data_as<scalar_t>(out), stream);
  });
  PYVLM_CHECK_LAUNCH(name);
}

void preprocess_images_cuda(at::Tensor& out, at::TensorList images, c10::IntArrayRef source_index,
                            c10::IntArrayRef resize_hw, c10::IntArrayRef crop_tl, int64_t resample,
                            double rescale_factor, c10::ArrayRef<double> mean,
                            c10::ArrayRef<double> std, c10::IntArrayRef fill) {
  const Resample filter = check_resample(resample);
  const auto image_hw = check_images(images, out);
  const auto specs = check_preprocess_images(out, image_hw, source_index, resize_hw, crop_tl, mean,
                                             std, fill);
  run_preprocess(out, images, image_hw, specs, filter, rescale_factor, mean, std, fill.data(),
                 cuda::CropLayout{}, "preprocess_images");
}

void preprocess_images_patchify_cuda(at::Tensor& out, at::TensorList images,
                                     c10::IntArrayRef resize_hw, int64_t resample,
                                     double rescale_factor, c10::ArrayRef<double> mean,
                                     c10::ArrayRef<double> std, int64_t patch_size,
                                     int64_t temporal_patch_size, int64_t merge_size) {
  const Resample filter = check_resample(resample);
  const auto image_hw = check_images(images, out);
  const auto specs = check_preprocess_patchify(out, image_hw, resize_hw, mean, std, patch_size,
                                               temporal_patch_size, merge_size);
  const int64_t no_fill[3] = {0, 0, 0};  // patch windows never leave the image
  run_preprocess(out, images, image_hw, specs, filter, rescale_factor, mean, std, no_fill,
                 cuda::PatchLayout{patch_size, temporal_patch_size, merge_size},
                 "preprocess_images_patchify");
}

}  // namespace
}  // namespace pyvlm

TORCH_LIBRARY_IMPL(pyvlm, CUDA, m) {
  m.impl("preprocess_images", &pyvlm::preprocess_images_cuda);
  m.impl("preprocess_images_patchify", &pyvlm::preprocess_images_patchify_cuda);
}
