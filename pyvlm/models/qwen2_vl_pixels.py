"""Patch rows of Qwen2-VL / Qwen2.5-VL images, built on a given device with
one preprocess_images_patchify call per group of plans that share their
normalisation and patch shape (normally one call for a whole prompt).

The plans (pyvlm.multimodal.qwen2_vl) give each image's resized size; the op
resizes Pillow-exactly, normalises and patchifies in the order
Qwen2VLImageProcessorPil produces, so the rows equal its pixel_values.
"""

from typing import List, Sequence

import torch
from PIL import Image

from pyvlm.models.image_batches import image_hw, image_to_tensor, run_grouped
from pyvlm.multimodal.qwen2_vl import Qwen2VLImagePlan
from pyvlm.ops.preprocess import preprocess_images_patchify


def qwen2_vl_pixel_values(images: Sequence[Image.Image], plans: Sequence[Qwen2VLImagePlan],
                          device="cpu", dtype: torch.dtype = torch.float32
                          ) -> List[torch.Tensor]:
    """Per image, its [num_patches, 3 * T * p * p] rows: transformers'
    pixel_values of that image (computed in float32, rounded once to dtype)."""
    if len(images) != len(plans):
        raise ValueError(f"{len(images)} images but {len(plans)} plans")
    sources = [_source_pixels(image, plan) for image, plan in zip(images, plans)]
    return run_grouped(sources, plans, _batch_key,
                       lambda group, group_plans: _patchify_group(group, group_plans, device, dtype))


def _batch_key(plan: Qwen2VLImagePlan) -> tuple:
    """What one op call must share."""
    return plan.normalization, plan.patch_size, plan.temporal_patch_size, plan.merge_size


def _source_pixels(image: Image.Image, plan: Qwen2VLImagePlan) -> torch.Tensor:
    if image_hw(image) != tuple(plan.image_size):
        raise ValueError(f"image is {'x'.join(map(str, image_hw(image)))} but its plan is "
                         f"for {plan.image_size}")
    return image_to_tensor(image)


def _patchify_group(sources, plans, device, dtype) -> List[torch.Tensor]:
    """One op call for plans sharing a _batch_key; split per image."""
    first, norm = plans[0], plans[0].normalization
    rows, _ = preprocess_images_patchify(
        sources, [plan.resized_size for plan in plans], resample=norm.resample,
        rescale_factor=norm.rescale_factor, mean=norm.mean, std=norm.std,
        patch_size=first.patch_size, temporal_patch_size=first.temporal_patch_size,
        merge_size=first.merge_size, dtype=dtype, device=device)
    return list(rows.split([plan.num_patches for plan in plans]))
