"""Qwen2-VL and Qwen2.5-VL: a ViT with 2-D rotary and a 2x2 patch merger
over a Qwen2 decoder with M-RoPE (transformers 5.24's modeling_qwen2_vl.py
and modeling_qwen2_5_vl.py).

The torch-free processor (pyvlm/multimodal/qwen2_vl.py) plans each image's
resize, token count and 3-D positions; prepare_images cuts the resized
pixels into patch rows when the request is built; encode_prepared runs the
tower once over every image of a step.
"""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from pyvlm.layers.tensor_parallel import building_tower
from pyvlm.scheduling.types import MultimodalItem
from .qwen2_vl_pixels import qwen2_vl_pixel_values
from .vision.qwen2_5_vl import Qwen2_5_VisionTransformer
from .vision.qwen2_vl import Qwen2VisionTransformer
from .vision_language import VisionLanguageModel

# checkpoint prefix -> model prefix: transformers 5 names, then the hub's
# original layout (visual.*, model.layers.*, lm_head.*).
QWEN2_VL_PREFIXES = (
    ("model.visual.", "visual."),
    ("model.language_model.", "language_model."),
    ("model.", "language_model."),
)


@dataclass(frozen=True)
class PreparedPatches:
    """One image ready for the tower: its patch rows [rows, 3*T*p*p] (CPU)
    and its patch grid (t, h, w)."""

    pixel_values: torch.Tensor
    grid_thw: Tuple[int, int, int]

    @property
    def num_bytes(self) -> int:
        return self.pixel_values.numel() * self.pixel_values.element_size()


class Qwen2VLForConditionalGeneration(VisionLanguageModel):
    """Qwen2-VL's vision tower over its M-RoPE Qwen2 decoder. Tensor
    parallel: the decoder splits over the group it is built in; the tower
    is built in `building_tower()`: replicated, every rank running it
    whole, or, when the engine shards towers (--mm-encoder-tp-mode
    weights), its blocks split by heads and MLP columns (patch embedding and
    merger whole), every rank still getting the whole output rows."""

    NAME_PREFIXES = QWEN2_VL_PREFIXES
    VISION_TOWER = Qwen2VisionTransformer

    def __init__(self, config):
        super().__init__(config, config.text_config)
        with building_tower():
            self.visual = self.VISION_TOWER(config.vision_config)
        self.image_token_id = config.image_token_id
        self.merge_size = config.vision_config.spatial_merge_size

    def prepare_images(self, images, plans, device="cpu") -> List[PreparedPatches]:
        """Patch rows of one prompt's images, on device (the CPU when the
        request is built; the model's device in the step on a GPU)."""
        pixels = qwen2_vl_pixel_values(images, plans, device, self.lm_head.weight.dtype)
        return [PreparedPatches(p, tuple(plan.grid_thw)) for p, plan in zip(pixels, plans)]

    def encode_prepared(self, items: Sequence[MultimodalItem]) -> List[torch.Tensor]:
        """Per item, its merged token rows [num_tokens, hidden] (one tower call)."""
        prepared = [item.prepared for item in items]
        device = self.lm_head.weight.device
        pixels = torch.cat([p.pixel_values for p in prepared]).to(device, non_blocking=True)
        rows = self.visual(pixels, [p.grid_thw for p in prepared])
        num_tokens = [t * h * w // self.merge_size ** 2 for t, h, w in
                      (p.grid_thw for p in prepared)]
        return list(rows.split(num_tokens))


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: the windowed, RMSNorm/SwiGLU tower; the same decoder."""

    VISION_TOWER = Qwen2_5_VisionTransformer
