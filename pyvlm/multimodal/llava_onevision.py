"""LLaVA-OneVision images without torch: preprocessing plans and token counts.

Reproduces transformers 5.24 exactly:
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

from pyvlm.multimodal.processor import ImageBudgetError, check_buffers, refuse_overrides  # noqa: F401

Size = Tuple[int, int]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SUPPORTED_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values


def default_grid_pinpoints(tile_size: int = 384, max_tiles_per_side: int = 6) -> Tuple[Size, ...]:
    """transformers' default pinpoints: every (i, j) tile grid up to 6 x 6."""
    sides = range(1, max_tiles_per_side + 1)
    return tuple((tile_size * i, tile_size * j) for i in sides for j in sides)


@dataclass(frozen=True)
class Normalization:
    """Resampling filter and (pixel * rescale_factor - mean) / std per channel."""

    resample: int = 3
    rescale_factor: float = 1 / 255
    mean: Tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: Tuple[float, float, float] = OPENAI_CLIP_STD


@dataclass(frozen=True)
class Tile:
    """One tile_size x tile_size output: the source resized to resize_hw, then
    the window whose top-left is crop_tl (pixels outside the resized image
    are zeros, i.e. transformers' np.pad)."""

    resize_hw: Size
    crop_tl: Size


@dataclass(frozen=True)
class SquareCanvas:
    """Multi-image path: the image pasted at (top, left) on a side x side
    canvas of `fill` (transformers' pad_to_square), which is then tiled."""

    side: int
    top: int
    left: int
    fill: Tuple[int, int, int]


@dataclass(frozen=True)
class ImagePlan:
    """How one image becomes pixel tiles and how many tokens it takes."""

    image_size: Size
    tile_size: int
    tiles: Tuple[Tile, ...]
    normalization: Normalization
    num_tokens: int
    best_resolution: Optional[Size] = None  # anyres only
    canvas: Optional[SquareCanvas] = None  # multi-image only

    @property
    def num_tiles(self) -> int:
        return len(self.tiles)

    @property
    def variant(self) -> str:
        """Names the processing path; part of the image's cache key."""
        return "anyres" if self.canvas is None else "pad_square"

    @property
    def num_pixel_values(self) -> int:
        """Values of the tower input it becomes: num_tiles x 3 x tile x tile."""
        return self.num_tiles * 3 * self.tile_size ** 2

    @property
    def num_buffer_pixels(self) -> int:
        """Pixels of the largest image preprocessing holds: the square
        canvas of the multi-image path, else the largest resized image."""
        canvas = self.canvas.side ** 2 if self.canvas is not None else 0
        return max([canvas] + [h * w for h, w in (tile.resize_hw for tile in self.tiles)])

    def buffer_description(self) -> str:
        if self.canvas is not None:
            side = self.canvas.side
            return (f"a {side}x{side} square canvas (each image of a multi-image prompt is "
                    f"padded to a square)")
        height, width = max((tile.resize_hw for tile in self.tiles), key=lambda hw: hw[0] * hw[1])
        return f"a {width}x{height} resized copy"


def select_best_resolution(image_size: Size, pinpoints: Sequence[Size]) -> Size:
    """transformers' select_best_resolution: the pinpoint keeping the most
    original pixels, ties broken by the least wasted area (first wins)."""
    height, width = image_size
    best, max_effective, min_wasted = None, 0, float("inf")
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_width * pin_height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            best, max_effective, min_wasted = (pin_height, pin_width), effective, wasted
    return best


def patch_output_size(image_size: Size, target: Size) -> Size:
    """transformers' get_patch_output_size: the image resized to fit target."""
    height, width = image_size
    target_height, target_width = target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def max_num_patches_of(vision_aspect_ratio: str) -> int:
    """9 for "anyres_max_9": the feature area, in tiles, kept before downsampling."""
    match = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio)
    if match is None:
        raise ValueError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not anyres_max_<N>")
    return int(match.group(1))


def unpadding_crop(image_size: Size, current_size: Size) -> Tuple[int, int, int, int]:
    """The crop (top, bottom, left, right) of a [current_size] feature map
    that removes the letterbox padding anyres added around an image of
    image_size (the model's unpad_image)."""
    height, width = image_size
    rows, cols = current_size
    if width / height > cols / rows:
        new_height = int(round(height * (cols / width), 7))
        padding = (rows - new_height) // 2
        return padding, rows - padding, 0, cols
    new_width = int(round(width * (rows / height), 7))
    padding = (cols - new_width) // 2
    return 0, rows, padding, cols - padding


def unpadded_feature_grid(image_size: Size, grid_rows: int, grid_cols: int) -> Size:
    """(rows, cols) of the feature grid once the padding is removed."""
    top, bottom, left, right = unpadding_crop(image_size, (grid_rows, grid_cols))
    return bottom - top, right - left


def anyres_grid_shape(image_size: Size, pinpoints: Sequence[Size], tile_size: int) -> Size:
    """(rows, columns) of tiles of the best resolution."""
    height, width = select_best_resolution(image_size, pinpoints)
    return height // tile_size, width // tile_size


def num_anyres_tiles(image_size: Size, pinpoints: Sequence[Size], tile_size: int) -> int:
    """Grid tiles plus the base (whole image) tile."""
    height, width = select_best_resolution(image_size, pinpoints)
    return math.ceil(height / tile_size) * math.ceil(width / tile_size) + 1


def downsampled_feature_grid(rows: int, cols: int, features_per_side: int,
                             max_num_patches: int) -> Size:
    """anyres_max_N: grids over ~N tiles' worth of features are bilinearly
    shrunk by ratio (1.1 tolerance), as pack_image_features does."""
    ratio = math.sqrt(rows * cols / (max_num_patches * features_per_side ** 2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


@dataclass(frozen=True)
class LlavaOnevisionImageConfig:
    """The preprocessor and model settings that shape LLaVA-OneVision images.

    tile_size: the processor's size (= the vision tower's image_size);
    patch_size: the vision tower's patch size. Plain data: build it with
    `from_configs` from preprocessor_config.json and config.json contents.
    """

    tile_size: int = 384
    patch_size: int = 14
    grid_pinpoints: Tuple[Size, ...] = default_grid_pinpoints()
    normalization: Normalization = Normalization()
    square_fill: Tuple[int, int, int] = tuple(int(m * 255) for m in OPENAI_CLIP_MEAN)
    vision_aspect_ratio: str = "anyres_max_9"
    vision_feature_select_strategy: str = "full"

    def __post_init__(self):
        max_num_patches_of(self.vision_aspect_ratio)
        if self.normalization.resample not in SUPPORTED_RESAMPLE:
            raise ValueError(f"resample {self.normalization.resample} is not supported "
                             f"(only {sorted(SUPPORTED_RESAMPLE)})")
        for pin in self.grid_pinpoints:
            if pin[0] % self.tile_size or pin[1] % self.tile_size or min(pin) <= 0:
                raise ValueError(f"grid pinpoint {pin} is not a multiple of the tile {self.tile_size}")

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

    def placeholder_text(self, image_token: str) -> str:
        """A prompt writes one image token per image (expanded later)."""
        return image_token

    def with_overrides(self, mm_processor_kwargs: Optional[Mapping[str, Any]]
                       ) -> "LlavaOnevisionImageConfig":
        """LLaVA-OneVision's processing has no per-request settings."""
        refuse_overrides("LLaVA-OneVision", mm_processor_kwargs)
        return self

    def prompt_positions(self, prompt_ids, spans, plans) -> None:
        """1-D positions: token i at position i."""
        return None

    def _anyres_plan(self, image_size: Size, num_tokens: int) -> ImagePlan:
        best = select_best_resolution(image_size, self.grid_pinpoints)
        resized = patch_output_size(image_size, best)
        top, left = (best[0] - resized[0]) // 2, (best[1] - resized[1]) // 2
        side = self.tile_size
        grid = [Tile(resized, (row - top, col - left))
                for row in range(0, best[0], side) for col in range(0, best[1], side)]
        tiles = (Tile((side, side), (0, 0)), *grid)
        return ImagePlan(image_size, side, tiles, self.normalization, num_tokens, best_resolution=best)

    def _square_plan(self, image_size: Size, num_tokens: int) -> ImagePlan:
        height, width = image_size
        side = max(height, width)
        canvas = SquareCanvas(side, (side - height) // 2, (side - width) // 2, self.square_fill)
        tiles = (Tile((self.tile_size, self.tile_size), (0, 0)),)
        return ImagePlan(image_size, self.tile_size, tiles, self.normalization, num_tokens,
                         canvas=canvas)

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
