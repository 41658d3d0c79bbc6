"""LLaVA-NeXT images without torch: preprocessing plans and token counts.

Reproduces transformers 5.25's LlavaNextForConditionalGeneration
(llava-hf/llava-v1.6-*-hf, llava-hf/llama3-llava-next-8b-hf) exactly:
- LlavaNextImageProcessorPil: every image of a prompt, one or several, is
  processed anyres: a base tile, the whole image squashed to tile x tile
  (resize to (size, size), aspect not kept, the configured filter), then
  the image resized into the best grid pinpoint (aspect kept, ceil),
  centered on zeros and cut into crop_size tiles, row by row. The per-tile
  resize to shortest_edge and center crop that follow are no-ops (each tile
  already has the crop size, which must equal the size).
- LlavaNextProcessor._get_number_of_features (and the model's
  pack_image_features): base features (+ CLS) + the unpadded grid features
  + one image_newline per feature row, one less for
  vision_feature_select_strategy "default". No anyres_max downsampling.
Sizes and pinpoints are (height, width).
"""

from dataclasses import dataclass
from typing import Mapping, Tuple

from pyvlm.multimodal.anyres import (check_pinpoints, grid_feature_crop, grid_tiles,
                                     num_grid_tokens, select_best_resolution, squashed_tile)
from pyvlm.multimodal.processor import ImageProcessorBase
from pyvlm.multimodal.tile_plans import ImagePlan, Normalization, Size, check_resample

# transformers' LlavaNextImageProcessor and LlavaNextConfig default, the
# llava-v1.6 checkpoints' own.
DEFAULT_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
STRATEGIES = ("default", "full")


def check_strategy(strategy: str, num_cls_tokens: int) -> None:
    """A grid tile's features reshape into a features_per_side square only
    when "default" drops exactly the CLS token: CLIP with "default", SigLIP
    (no CLS) with "full" (other pairs break pack_image_features' view)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not one of {STRATEGIES}")
    if num_cls_tokens != (strategy == "default"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} with {num_cls_tokens} CLS "
                         f"token(s) leaves tiles whose features are not a square grid")


@dataclass(frozen=True)
class LlavaNextImageConfig(ImageProcessorBase):
    """The preprocessor and model settings that shape LLaVA-NeXT images.

    tile_size: the processor's size and crop_size (= the vision tower's
    image_size); patch_size: the tower's patch size; num_cls_tokens:
    transformers' num_additional_image_tokens (1 for CLIP's CLS).
    truncate_unpad: the LLaVA repository's unpad_image (int(x)) instead of
    transformers' (int(round(x, 7))); the repository's layout sets it (with
    its pinpoints swapped to (height, width) and a bicubic resize: see
    llava_configs.as_llava_repo). Plain data: build it with `from_hf_configs`.
    """

    FAMILY = "LLaVA-NeXT"

    tile_size: int = 336
    patch_size: int = 14
    grid_pinpoints: Tuple[Size, ...] = DEFAULT_GRID_PINPOINTS
    normalization: Normalization = Normalization()
    vision_feature_select_strategy: str = "default"
    num_cls_tokens: int = 1
    truncate_unpad: bool = False

    def __post_init__(self):
        check_resample(self.normalization.resample)
        check_pinpoints(self.grid_pinpoints, self.tile_size)
        check_strategy(self.vision_feature_select_strategy, self.num_cls_tokens)

    @property
    def features_per_side(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def num_tile_features(self) -> int:
        """Features the base tile gives (CLS kept or dropped)."""
        drop = self.vision_feature_select_strategy == "default"
        return self.features_per_side ** 2 + self.num_cls_tokens - drop

    def best_resolution(self, image_size: Size) -> Size:
        return select_best_resolution(image_size, self.grid_pinpoints)

    def grid_shape(self, image_size: Size) -> Size:
        """(rows, columns) of grid tiles (the model's get_anyres_image_grid_shape)."""
        height, width = self.best_resolution(image_size)
        return height // self.tile_size, width // self.tile_size

    def feature_crop(self, image_size: Size) -> Tuple[int, int, int, int]:
        """(top, bottom, left, right) of the grid's feature map kept by unpad_image."""
        return grid_feature_crop(image_size, self.best_resolution(image_size), self.tile_size,
                                 self.features_per_side, self.truncate_unpad)

    def num_image_tokens(self, image_size: Size) -> int:
        """Placeholder tokens transformers' processor inserts for this image."""
        return self.num_tile_features + num_grid_tokens(self.feature_crop(image_size))

    def plan(self, image_size: Size) -> ImagePlan:
        """The base tile then the grid tiles of one image."""
        _check_size(image_size)
        best = self.best_resolution(image_size)
        crop = grid_feature_crop(image_size, best, self.tile_size, self.features_per_side,
                                 self.truncate_unpad)
        tiles = (squashed_tile(self.tile_size), *grid_tiles(image_size, best, self.tile_size))
        return ImagePlan(image_size, self.tile_size, tiles, self.normalization,
                         self.num_tile_features + num_grid_tokens(crop), "anyres",
                         best_resolution=best, feature_crop=crop)

    @classmethod
    def from_hf_configs(cls, preprocessor_config: Mapping,
                        model_config: Mapping) -> "LlavaNextImageConfig":
        """From preprocessor_config.json and config.json contents (dicts)."""
        from .llava_configs import llava_next_kwargs

        return cls(**llava_next_kwargs(preprocessor_config, model_config))


def _check_size(image_size: Size) -> None:
    if min(image_size) <= 0:
        raise ValueError(f"image size {image_size} has no pixels")
