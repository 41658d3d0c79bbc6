"""Vision towers shared by the VLM families (one file per tower family).

The Qwen2-VL / Qwen2.5-VL towers take every image of a step in one call:
forward(pixel_values [num_patches, patch_dim], grid_thw [(t, h, w), ...])
-> merged token rows, image after image.
"""

from .qwen2_5_vl import Qwen2_5_VisionTransformer  # noqa: F401
from .qwen2_vl import Qwen2VisionTransformer  # noqa: F401
