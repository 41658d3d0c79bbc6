"""Pixel tiles of the LLaVA families' image plans (LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision; pyvlm.multimodal.tile_plans), built on a given device (the
engine: the CPU, when a request is built) with one preprocess_images call
per normalisation (normally one for a whole prompt).

Each tile is a window of a resized copy of the image (or of its square
canvas); preprocess_images resizes each (image, size) pair once, so the
anyres tiles of an image share one resize. Bit-exact with transformers'
PIL image processors (LlavaImageProcessorPil, CLIPImageProcessorPil,
LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil).
"""

from typing import List, Sequence

import torch
from PIL import Image

from pyvlm.models.image_batches import image_hw, image_to_tensor, run_grouped
from pyvlm.multimodal.tile_plans import ImagePlan, SquareCanvas
from pyvlm.ops.preprocess import preprocess_images


def paste_on_canvas(pixels: torch.Tensor, canvas: SquareCanvas) -> torch.Tensor:
    """transformers' pad_to_square: the image centered on a fill-colored square."""
    out = torch.empty(canvas.side, canvas.side, 3, dtype=torch.uint8, device=pixels.device)
    for channel, value in enumerate(canvas.fill):  # fills, not a blocking host copy
        out[..., channel].fill_(value)
    height, width = pixels.shape[:2]
    out[canvas.top:canvas.top + height, canvas.left:canvas.left + width] = pixels
    return out


def _source_pixels(image: Image.Image, plan: ImagePlan) -> torch.Tensor:
    if image_hw(image) != tuple(plan.image_size):
        raise ValueError(f"image is {'x'.join(map(str, image_hw(image)))} but its plan is "
                         f"for {plan.image_size}")
    pixels = image_to_tensor(image)
    return pixels if plan.canvas is None else paste_on_canvas(pixels, plan.canvas)


def llava_pixel_values(images: Sequence[Image.Image], plans: Sequence[ImagePlan], device,
                       dtype: torch.dtype = torch.float32) -> List[torch.Tensor]:
    """Per image, its [num_tiles, 3, S, S] tiles in the plan's order, equal
    to the transformers processor's pixel_values without batch padding."""
    if len(images) != len(plans):
        raise ValueError(f"{len(images)} images but {len(plans)} plans")
    sources = [_source_pixels(image, plan) for image, plan in zip(images, plans)]
    return run_grouped(sources, plans, lambda plan: plan.normalization,
                       lambda group, group_plans: _preprocess_group(group, group_plans,
                                                                    device, dtype))


def _preprocess_group(sources, plans, device, dtype) -> List[torch.Tensor]:
    """One op call for images sharing a normalisation; split per image."""
    source_index = [i for i, plan in enumerate(plans) for _ in plan.tiles]
    tiles = [tile for plan in plans for tile in plan.tiles]
    norm, side = plans[0].normalization, plans[0].tile_size
    if any(plan.tile_size != side for plan in plans):
        raise ValueError("plans of one batch must share the tile size")
    out = preprocess_images(sources, [t.resize_hw for t in tiles], [t.crop_tl for t in tiles],
                            (side, side), source_index=source_index, resample=norm.resample,
                            rescale_factor=norm.rescale_factor, mean=norm.mean, std=norm.std,
                            fill=(0, 0, 0), dtype=dtype, device=device)
    return list(out.split([plan.num_tiles for plan in plans]))
