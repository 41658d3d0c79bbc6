"""LLaVA-OneVision images without torch: preprocessing plans and token counts.

Reproduces transformers 5.24 exactly (the anyres geometry and the tile
plans are shared with the other LLaVA families: anyres.py, tile_plans.py):
- LlavaOnevisionImageProcessorPil: a lone image in a prompt is processed
  "anyres": a base tile (the image resized to tile x tile) followed by the
  tiles of the image resized into the best grid pinpoint (aspect kept,
  centered, zero padded), row by row. An image in a multi-image prompt is
  padded to a square with the mean color and resized to one tile.
- LlavaOnevisionProcessor._get_number_of_features and the model's
  pack_image_features: base features + the unpadded grid features (bilinear
  downsampled when over anyres_max_N tiles) + one image_newline per row;
  a multi-image tile gives its features + one newline.
Sizes are (height, width).
"""

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple

from pyvlm.multimodal.anyres import (anyres_grid_shape, check_pinpoints,  # noqa: F401
                                     grid_tiles, num_anyres_tiles, patch_output_size,
                                     select_best_resolution, squashed_tile,
                                     unpadded_feature_grid, unpadding_crop)
from pyvlm.multimodal.processor import (ImageBudgetError, ImageProcessorBase,  # noqa: F401
                                        check_buffers, refuse_overrides)
from pyvlm.multimodal.tile_plans import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,  # noqa: F401
                                         SUPPORTED_RESAMPLE, ImagePlan, Normalization, Size,
                                         SquareCanvas, Tile, check_resample, square_canvas)


def default_grid_pinpoints(tile_size: int = 384, max_tiles_per_side: int = 6) -> Tuple[Size, ...]:
    """transformers' default pinpoints: every (i, j) tile grid up to 6 x 6."""
    sides = range(1, max_tiles_per_side + 1)
    return tuple((tile_size * i, tile_size * j) for i in sides for j in sides)


def max_num_patches_of(vision_aspect_ratio: str) -> int:
    """9 for "anyres_max_9": the feature area, in tiles, kept before downsampling."""
    match = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio)
    if match is None:
        raise ValueError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not anyres_max_<N>")
    return int(match.group(1))


def downsampled_feature_grid(rows: int, cols: int, features_per_side: int,
                             max_num_patches: int) -> Size:
    """anyres_max_N: grids over ~N tiles' worth of features are bilinearly
    shrunk by ratio (1.1 tolerance), as pack_image_features does."""
    ratio = math.sqrt(rows * cols / (max_num_patches * features_per_side ** 2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


@dataclass(frozen=True)
class LlavaOnevisionImageConfig(ImageProcessorBase):
    """The preprocessor and model settings that shape LLaVA-OneVision images.

    tile_size: the processor's size (= the vision tower's image_size);
    patch_size: the vision tower's patch size. Plain data: build it with
    `from_configs` from preprocessor_config.json and config.json contents.
    """

    FAMILY = "LLaVA-OneVision"

    tile_size: int = 384
    patch_size: int = 14
    grid_pinpoints: Tuple[Size, ...] = default_grid_pinpoints()
    normalization: Normalization = Normalization()
    square_fill: Tuple[int, int, int] = tuple(int(m * 255) for m in OPENAI_CLIP_MEAN)
    vision_aspect_ratio: str = "anyres_max_9"
    vision_feature_select_strategy: str = "full"

    def __post_init__(self):
        max_num_patches_of(self.vision_aspect_ratio)
        check_resample(self.normalization.resample)
        check_pinpoints(self.grid_pinpoints, self.tile_size)

    @property
    def features_per_side(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def num_tile_features(self) -> int:
        """Vision features of one tile (the processor's num_image_tokens)."""
        return self.features_per_side ** 2

    @property
    def max_num_patches(self) -> int:
        return max_num_patches_of(self.vision_aspect_ratio)

    def num_image_tokens(self, image_size: Size, num_images_in_prompt: int) -> int:
        """Placeholder tokens transformers' processor inserts for this image."""
        if num_images_in_prompt > 1:
            count = self.num_tile_features + 1
        else:
            count = self.num_tile_features + self._num_anyres_grid_tokens(image_size)
        return count - 1 if self.vision_feature_select_strategy == "default" else count

    def _num_anyres_grid_tokens(self, image_size: Size) -> int:
        best_height, best_width = select_best_resolution(image_size, self.grid_pinpoints)
        side = self.features_per_side
        rows, cols = unpadded_feature_grid(image_size, side * (best_height // self.tile_size),
                                           side * (best_width // self.tile_size))
        rows, cols = downsampled_feature_grid(rows, cols, side, self.max_num_patches)
        return rows * cols + rows  # one image_newline per row

    def plan(self, image_size: Size, num_images_in_prompt: int) -> ImagePlan:
        """The tiles of one image of a prompt holding num_images_in_prompt images."""
        _check_size(image_size)
        num_tokens = self.num_image_tokens(image_size, num_images_in_prompt)
        if num_images_in_prompt > 1:
            return self._square_plan(image_size, num_tokens)
        return self._anyres_plan(image_size, num_tokens)

    def plan_prompt(self, image_sizes: Sequence[Size],
                    max_buffer_pixels: Optional[int] = None) -> list:
        """Plans of all the images of one prompt, in order; with
        max_buffer_pixels, ImageBudgetError for an image whose preprocessing
        would hold a larger buffer."""
        plans = [self.plan(size, len(image_sizes)) for size in image_sizes]
        if max_buffer_pixels is not None:
            check_buffers(plans, max_buffer_pixels)
        return plans

    def _anyres_plan(self, image_size: Size, num_tokens: int) -> ImagePlan:
        best = select_best_resolution(image_size, self.grid_pinpoints)
        tiles = (squashed_tile(self.tile_size), *grid_tiles(image_size, best, self.tile_size))
        return ImagePlan(image_size, self.tile_size, tiles, self.normalization, num_tokens,
                         "anyres", best_resolution=best)

    def _square_plan(self, image_size: Size, num_tokens: int) -> ImagePlan:
        tiles = (squashed_tile(self.tile_size),)
        return ImagePlan(image_size, self.tile_size, tiles, self.normalization, num_tokens,
                         "pad_square", canvas=square_canvas(image_size, self.square_fill))

    @classmethod
    def from_configs(cls, preprocessor_config: Mapping, *, vision_image_size: int = 384,
                     vision_patch_size: int = 14, vision_aspect_ratio: str = "anyres_max_9",
                     vision_feature_select_strategy: str = "full",
                     grid_pinpoints: Optional[Sequence[Sequence[int]]] = None
                     ) -> "LlavaOnevisionImageConfig":
        """From preprocessor_config.json contents and the model's vision values.

        grid_pinpoints: the model's, used when the preprocessor has none.
        """
        from .llava_onevision_config import config_kwargs

        return cls(**config_kwargs(preprocessor_config, vision_image_size, vision_patch_size,
                                   vision_aspect_ratio, vision_feature_select_strategy,
                                   grid_pinpoints))

    @classmethod
    def from_hf_configs(cls, preprocessor_config: Mapping,
                        model_config: Mapping) -> "LlavaOnevisionImageConfig":
        """From preprocessor_config.json and config.json contents (dicts)."""
        vision = model_config.get("vision_config") or {}
        return cls.from_configs(
            preprocessor_config, vision_image_size=vision.get("image_size", 384),
            vision_patch_size=vision.get("patch_size", 14),
            vision_aspect_ratio=model_config.get("vision_aspect_ratio", "anyres_max_9"),
            vision_feature_select_strategy=model_config.get("vision_feature_select_strategy", "full"),
            grid_pinpoints=model_config.get("image_grid_pinpoints"))


def _check_size(image_size: Size) -> None:
    if min(image_size) <= 0:
        raise ValueError(f"image size {image_size} has no pixels")
