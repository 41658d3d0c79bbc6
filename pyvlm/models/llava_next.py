"""LLaVA-NeXT (LLaVA-1.6, Llama3-LLaVA-NeXT): a CLIP tower, the 2-layer
projector and anyres images over a Llama, Mistral or Qwen2 decoder
(transformers 5.25's modeling_llava_next.py): every image of a prompt is
its base tile, then its tile grid unpadded to the image's aspect ratio with
an image_newline after every row (no downsampling: that is OneVision's)."""

from typing import Optional, Tuple

import torch

from .llava_family import LlavaFamilyModel
from .llava_images import Geometry


class LlavaNextForConditionalGeneration(LlavaFamilyModel):
    """Anyres tiles for every image (llava_family.py holds the rest)."""

    def num_tiles_used(self, image_size: Tuple[int, int], is_single_image: bool) -> int:
        return self.num_anyres_tiles(image_size)

    def pack_image_features(self, features: torch.Tensor, image_size: Tuple[int, int],
                            geometry: Optional[Geometry] = None) -> torch.Tensor:
        return self.pack_anyres_features(features, image_size, geometry=geometry)
