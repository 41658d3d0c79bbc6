"""LLaVA-1.5: a CLIP tower read at vision_feature_layer (-2), the 2-layer
projector and one 336 px tile per image (576 tokens) over a Llama / Vicuna
/ Mistral decoder (transformers 5.25's modeling_llava.py); no
image_newline."""

from typing import Optional, Tuple

import torch

from .llava_family import LlavaFamilyModel
from .llava_images import Geometry


class LlavaForConditionalGeneration(LlavaFamilyModel):
    """One tile per image; its features are the image's rows."""

    HAS_IMAGE_NEWLINE = False

    def num_tiles_used(self, image_size: Tuple[int, int], is_single_image: bool) -> int:
        return 1

    def pack_image_features(self, features: torch.Tensor, image_size: Tuple[int, int],
                            geometry: Optional[Geometry] = None) -> torch.Tensor:
        return features[0]
