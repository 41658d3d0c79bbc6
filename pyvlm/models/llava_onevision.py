"""LLaVA-OneVision: SigLIP tower, 2-layer projector, Llama/Qwen2 decoder.

Image features follow transformers 5.24's modeling_llava_onevision.py: a
prompt with one image uses anyres tiling (base tile, then the tile grid
unpadded to the image's aspect ratio, bilinearly downsampled to at most
anyres_max_N base tiles of area, an image_newline after every row); a
prompt with several images uses each image's base tile plus one newline.
The tower, projector and packing are the LLaVA family's (llava_family.py).
"""

from typing import Optional, Tuple

import torch

from pyvlm.multimodal.llava_onevision import max_num_patches_of
from .llava_family import LLAVA_PREFIXES, LlavaFamilyModel, LlavaMultiModalProjector
from .llava_images import Geometry

LLAVA_ONEVISION_PREFIXES = LLAVA_PREFIXES
LlavaOnevisionMultiModalProjector = LlavaMultiModalProjector


class LlavaOnevisionForConditionalGeneration(LlavaFamilyModel):
    """SigLIP tower + projector + image_newline over a Llama/Qwen2 decoder."""

    def __init__(self, config):
        if config.vision_config.model_type != "siglip_vision_model":
            raise NotImplementedError(f"vision tower {config.vision_config.model_type!r} "
                                      "(supported: siglip_vision_model)")
        super().__init__(config)

    def num_tiles_used(self, image_size: Tuple[int, int], is_single_image: bool) -> int:
        """Tiles the model reads: anyres grid + base, or the base tile alone."""
        return self.num_anyres_tiles(image_size) if is_single_image else 1

    def pack_image_features(self, features: torch.Tensor, image_size: Tuple[int, int],
                            geometry: Optional[Geometry] = None) -> torch.Tensor:
        """[num_tiles, features_per_tile, hidden] -> the image's token rows."""
        return self.pack_anyres_features(
            features, image_size, max_num_patches_of(self.config.vision_aspect_ratio), geometry)
