"""Pixel tiles of Llama-3.2-Vision (mllama) images, built on a given device
with one preprocess_images call per normalisation (normally one per prompt).

The plans (pyvlm.multimodal.mllama) give each image's resized size and
canvas; every tile is the tile_size window at its offset in the resized
image, one shared resize per image. transformers pads the resized image
with uint8-valued zeros BEFORE rescaling and normalising, so its padding
becomes (0 * rescale_factor - mean) / std: exactly what the op's fill=(0,
0, 0) yields (fill pixels are normalised like image pixels).

transformers then stacks every image into max_image_tiles tiles, the extra
ones raw 0.0 (pack_images, not normalised), with aspect_ratio_mask marking
the real ones; pyvlm returns only the real tiles (the mask says which of a
padded batch they would be).
"""

from typing import List, Sequence

import torch
from PIL import Image

from pyvlm.models.image_batches import image_hw, image_to_tensor, run_grouped
from pyvlm.multimodal.mllama import MllamaImagePlan
from pyvlm.ops.preprocess import preprocess_images


def mllama_pixel_values(images: Sequence[Image.Image], plans: Sequence[MllamaImagePlan],
                        device="cpu", dtype: torch.dtype = torch.float32) -> List[torch.Tensor]:
    """Per image, its [num_tiles, 3, tile, tile] real tiles: transformers'
    pixel_values[0, i, :num_tiles] (computed in float32, rounded once to dtype)."""
    if len(images) != len(plans):
        raise ValueError(f"{len(images)} images but {len(plans)} plans")
    sources = [_source_pixels(image, plan) for image, plan in zip(images, plans)]
    return run_grouped(sources, plans, _batch_key,
                       lambda group, group_plans: _tile_group(group, group_plans, device, dtype))


def _batch_key(plan: MllamaImagePlan) -> tuple:
    """What one op call must share."""
    return plan.normalization, plan.tile_size


def _source_pixels(image: Image.Image, plan: MllamaImagePlan) -> torch.Tensor:
    if image_hw(image) != tuple(plan.image_size):
        raise ValueError(f"image is {'x'.join(map(str, image_hw(image)))} but its plan is "
                         f"for {plan.image_size}")
    return image_to_tensor(image)


def _tile_group(sources, plans, device, dtype) -> List[torch.Tensor]:
    """One op call for plans sharing a _batch_key; split per image."""
    source_index = [i for i, plan in enumerate(plans) for _ in plan.tile_offsets]
    resize_hw = [plan.resized_size for plan in plans for _ in plan.tile_offsets]
    crop_tl = [offset for plan in plans for offset in plan.tile_offsets]
    norm, side = plans[0].normalization, plans[0].tile_size
    out = preprocess_images(sources, resize_hw, crop_tl, (side, side), source_index=source_index,
                            resample=norm.resample, rescale_factor=norm.rescale_factor,
                            mean=norm.mean, std=norm.std, fill=(0, 0, 0), dtype=dtype,
                            device=device)
    return list(out.split([plan.num_tiles for plan in plans]))
