"""The encode function of LLaVA-OneVision for the VisionBatcher: all images
of a step are preprocessed by the extension in one call and go through the
vision tower in one batched call."""

from typing import List, Sequence

import torch

from pyvlm.engine.types import MultimodalItem
from pyvlm.runner.vision_inputs import llava_onevision_pixel_values


def make_llava_onevision_encoder(model, device: torch.device, dtype: torch.dtype):
    """items carry data = (RGB PIL image, ImagePlan, number of images in its prompt)."""

    def encode(items: Sequence[MultimodalItem]) -> List[torch.Tensor]:
        images = [item.data[0] for item in items]
        plans = [item.data[1] for item in items]
        pixel_values = llava_onevision_pixel_values(images, plans, device, dtype)
        return model.embed_images(pixel_values, [plan.image_size for plan in plans],
                                  [item.data[2] for item in items])

    return encode
