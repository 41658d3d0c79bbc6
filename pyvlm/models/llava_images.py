"""The LLaVA families' two image stages for the engine (the model class
exposes them as prepare_images and encode_prepared).

`prepare_images` runs when a request is built (the caller's thread or the
server's executor, never the engine step): it turns the decoded images of
one prompt into pixel tiles on the CPU, in the model's dtype, with the
extension's Pillow-exact preprocessing (one op call per prompt).
`encode_prepared` runs in the step: the tiles of every image that missed
the encoder cache go to the device and through the vision tower in one
batched call.
"""

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from PIL import Image

from pyvlm.scheduling.types import MultimodalItem
from pyvlm.multimodal.llava_onevision import ImagePlan
from pyvlm.models.llava_pixels import llava_pixel_values


class Geometry(NamedTuple):
    """How the model reads one image's tiles, as its plan made them."""

    num_tiles: int
    grid_shape: Optional[Tuple[int, int]]
    feature_crop: Optional[Tuple[int, int, int, int]]


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the tower: its tiles [num_tiles, 3, S, S] (CPU),
    its original (height, width), the number of images in its prompt
    (OneVision: one: anyres tiles; more: one tile) and, where the plan
    has a tile grid, its geometry: (rows, columns) of grid tiles and the
    feature-map crop removing the letterbox (None: the model's rules)."""

    pixel_values: torch.Tensor
    image_size: Tuple[int, int]
    num_images_in_prompt: int
    grid_shape: Optional[Tuple[int, int]] = None
    feature_crop: Optional[Tuple[int, int, int, int]] = None

    @property
    def num_bytes(self) -> int:
        return self.pixel_values.numel() * self.pixel_values.element_size()


def prepare_images(images: Sequence[Image.Image], plans: Sequence[ImagePlan],
                   dtype: torch.dtype, device="cpu") -> List[PreparedImage]:
    """One PreparedImage per image of a prompt, its tiles on device.

    Tiles made on the CPU stay in pageable memory: pinned ones would make
    the copy to the GPU asynchronous, but CUDA's caching host allocator
    never gives pinned blocks back, so queued requests' tiles would grow the
    server's resident memory to its high-water mark (seen in the H200 soak)."""
    tiles = llava_pixel_values(images, plans, device, dtype)
    return [PreparedImage(t, tuple(plan.image_size), len(plans), plan.grid_shape,
                          plan.feature_crop) for t, plan in zip(tiles, plans)]


def encode_prepared(model, items: Sequence[MultimodalItem]) -> List[torch.Tensor]:
    """The token rows of items whose prepared inputs are PreparedImages (one
    tower call); every prepared tile is read, in the plan's geometry."""
    prepared = [item.prepared for item in items]
    device = model.multi_modal_projector.linear_1.weight.device
    pixel_values = [p.pixel_values.to(device, non_blocking=True) for p in prepared]
    geometry = [Geometry(p.pixel_values.shape[0], p.grid_shape, p.feature_crop)
                for p in prepared]
    return model.embed_images(pixel_values, [p.image_size for p in prepared],
                              [p.num_images_in_prompt for p in prepared], geometry)
