"""Llama-3.2-Vision (mllama) images without torch: tiled-canvas plans.

Reproduces transformers 5.24's MllamaImageProcessorPil exactly:
- the canvas is a grid of (rows, cols) tiles of tile_size x tile_size with
  rows * cols <= max_image_tiles (get_all_supported_aspect_ratios);
- get_optimal_tiled_canvas picks, of the scales min(canvas_h / h, canvas_w /
  w), the smallest upscale (>= 1) or else the largest downscale, ties to
  the smallest canvas area (the first such in the supported order);
- the image is resized keeping its aspect ratio to fit the canvas
  (get_image_size_fit_to_canvas: small images grow to tile_size), padded
  with zeros on the bottom and right to the canvas (BEFORE rescale and
  normalise, so padding becomes (0 - mean) / std), and cut into tiles row by
  row;
- aspect_ratio_ids is the 1-based index of (rows, cols) in the supported
  list, aspect_ratio_mask is 1 for the image's tiles.
transformers then zero-pads every image to max_image_tiles tiles (raw 0.0,
not normalised) and batches; pyvlm's plans describe only the real tiles.

Token count: MllamaProcessor leaves each <|image|> as one token; the image's
tiles enter the language model through cross-attention, not as placeholder
tokens, so an image's num_tokens is 1, and its num_cross_rows (the K/V rows
the engine keeps for it) are its real tiles' patches. Which tokens attend
to which image is mllama_masks' rule (cross_attention_spans). Sizes are
(height, width).
"""

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Mapping, Optional, Sequence, Tuple

from pyvlm.multimodal.llava_onevision import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                              SUPPORTED_RESAMPLE, Normalization)
from pyvlm.multimodal.llava_onevision_config import normalization_of
from pyvlm.multimodal.mllama_masks import spans_from_offsets
from pyvlm.multimodal.processor import ImageProcessorBase, ResizedCopyBuffer, check_buffers

Size = Tuple[int, int]

IMAGE_TOKEN = "<|image|>"
BILINEAR = 2
IMAGENET_STANDARD = (0.5, 0.5, 0.5)  # transformers' mllama mean / std defaults
# The defaults of the dataclass: meta-llama/Llama-3.2-11B-Vision-Instruct's
# preprocessor_config.json (CLIP mean / std, bilinear, 560 px tiles, 4 tiles).
LLAMA_3_2_VISION_NORMALIZATION = Normalization(BILINEAR, 1 / 255, OPENAI_CLIP_MEAN,
                                               OPENAI_CLIP_STD)


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_image_tiles: int) -> Tuple[Size, ...]:
    """Every (rows, cols) tile grid with rows * cols <= max_image_tiles, in
    transformers' order (rows outer); aspect_ratio_id i + 1 names entry i.
    (transformers' docstring calls the pairs (width, height); its canvas
    code reads the first as the number of tile rows.)"""
    sides = range(1, max_image_tiles + 1)
    return tuple((rows, cols) for rows in sides for cols in sides if rows * cols <= max_image_tiles)


def optimal_tiled_canvas(height: int, width: int, max_image_tiles: int,
                         tile_size: int) -> Size:
    """(canvas height, canvas width): get_optimal_tiled_canvas. Python's
    float division and comparisons are numpy's float64 ones, so ties match."""
    canvases = [(rows * tile_size, cols * tile_size)
                for rows, cols in supported_aspect_ratios(max_image_tiles)]
    scales = [min(canvas_h / height, canvas_w / width) for canvas_h, canvas_w in canvases]
    upscales = [scale for scale in scales if scale >= 1]
    selected = min(upscales) if upscales else max(scales)
    chosen = [canvas for canvas, scale in zip(canvases, scales) if scale == selected]
    return min(chosen, key=lambda canvas: canvas[0] * canvas[1])  # min keeps the first tie


def size_fit_to_canvas(height: int, width: int, canvas_height: int, canvas_width: int,
                       tile_size: int) -> Size:
    """The resized (height, width): get_image_size_fit_to_canvas. Each side
    is first clipped into [tile_size, canvas side]; the side that scales
    less takes its target and the other follows (floor, at least 1)."""
    target_w = min(max(width, tile_size), canvas_width)
    target_h = min(max(height, tile_size), canvas_height)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


@dataclass(frozen=True)
class MllamaImagePlan(ResizedCopyBuffer):
    """How one image becomes tiles: resized to resized_size, zero padded to
    a canvas of (rows, cols) tiles, cut row by row."""

    image_size: Size
    resized_size: Size
    canvas: Size  # (tile rows, tile columns)
    tile_size: int
    max_image_tiles: int
    normalization: Normalization
    num_patches_per_tile: int = 0  # the tower's rows per tile (class token included)

    num_tokens = 1  # one <|image|> token: the tiles enter through cross-attention

    @property
    def num_tiles(self) -> int:
        rows, cols = self.canvas
        return rows * cols

    @property
    def num_cross_rows(self) -> int:
        """K/V rows the image keeps for cross-attention: its real tiles'
        patches (padding tiles are never stored)."""
        return self.num_tiles * self.num_patches_per_tile

    @property
    def tile_offsets(self) -> Tuple[Size, ...]:
        """(top, left) of each tile in the resized image, in transformers'
        order (split_to_tiles: row by row)."""
        rows, cols = self.canvas
        side = self.tile_size
        return tuple((row * side, col * side) for row in range(rows) for col in range(cols))

    @property
    def aspect_ratio_id(self) -> int:
        """transformers' aspect_ratio_ids entry (1-based; 0 is batch padding)."""
        return supported_aspect_ratios(self.max_image_tiles).index(self.canvas) + 1

    @property
    def aspect_ratio_mask(self) -> Tuple[int, ...]:
        """transformers' aspect_ratio_mask row: 1 for each real tile."""
        return (1,) * self.num_tiles + (0,) * (self.max_image_tiles - self.num_tiles)

    @property
    def variant(self) -> str:
        """Names the tiling: the same pixels tiled differently (another tile
        size, canvas or resize) never share a cache entry."""
        (height, width), (rows, cols) = self.resized_size, self.canvas
        return f"mllama:{self.tile_size}:{rows}x{cols}:{height}x{width}"

    @property
    def num_pixel_values(self) -> int:
        """Values of the real tiles: num_tiles x 3 x tile x tile."""
        return self.num_tiles * 3 * self.tile_size ** 2



@dataclass(frozen=True)
class MllamaImageConfig(ImageProcessorBase):
    """The preprocessor settings that shape Llama-3.2-Vision images. Plain
    data: build it with `from_hf_configs` from preprocessor_config.json and
    config.json contents. Defaults are the real checkpoints' settings."""

    FAMILY = "Llama-3.2-Vision"

    tile_size: int = 560
    max_image_tiles: int = 4
    normalization: Normalization = LLAMA_3_2_VISION_NORMALIZATION
    patch_size: int = 14

    # transformers lets the tokens before the first <|image|> cross-attend
    # to every image row (their mask row is cleared, only the MLP is gated):
    # their KV then depends on the images (pyvlm.scheduling.request's
    # pre_image_key).
    text_before_images_sees_images = True

    @property
    def num_patches_per_tile(self) -> int:
        """The vision tower's rows per tile: (tile / patch)^2 patches + a class token."""
        return (self.tile_size // self.patch_size) ** 2 + 1

    def __post_init__(self):
        for name in ("tile_size", "max_image_tiles", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.normalization.resample not in SUPPORTED_RESAMPLE:
            raise ValueError(f"resample {self.normalization.resample} is not supported "
                             f"(only {sorted(SUPPORTED_RESAMPLE)})")

    def plan(self, image_size: Size) -> MllamaImagePlan:
        """The canvas and resize of one image (ValueError for an empty one)."""
        height, width = image_size
        if min(height, width) <= 0:
            raise ValueError(f"the image is {width}x{height} pixels: it has no pixels")
        canvas_h, canvas_w = optimal_tiled_canvas(height, width, self.max_image_tiles,
                                                  self.tile_size)
        resized = size_fit_to_canvas(height, width, canvas_h, canvas_w, self.tile_size)
        canvas = (canvas_h // self.tile_size, canvas_w // self.tile_size)
        return MllamaImagePlan((height, width), resized, canvas, self.tile_size,
                               self.max_image_tiles, self.normalization,
                               self.num_patches_per_tile)

    def plan_prompt(self, image_sizes: Sequence[Size],
                    max_buffer_pixels: Optional[int] = None) -> List[MllamaImagePlan]:
        """Plans of one prompt's images, in order (each planned alone);
        ImageBudgetError for one whose resized copy exceeds max_buffer_pixels."""
        plans = []
        for index, size in enumerate(image_sizes, start=1):
            try:
                plans.append(self.plan(size))
            except ValueError as error:
                raise ValueError(f"image {index} of the prompt: {error}") from None
        if max_buffer_pixels is not None:
            check_buffers(plans, max_buffer_pixels)
        return plans

    def cross_attention_spans(self, offsets: Sequence[int]
                              ) -> List[Tuple[int, Optional[int]]]:
        """Per image (its <|image|> token at offsets[i]), the prompt positions
        [start, end) that attend to it (end None: to the end, generated
        tokens included), as transformers' get_cross_attention_token_mask."""
        return [(span.start, span.end) for span in spans_from_offsets(offsets)]

    @classmethod
    def from_hf_configs(cls, preprocessor_config: Mapping,
                        model_config: Mapping) -> "MllamaImageConfig":
        """From preprocessor_config.json and config.json contents (dicts), as
        meta-llama/Llama-3.2-*-Vision(-Instruct) ship them. Missing or null
        keys take transformers' MllamaImageProcessor defaults (224 px tiles,
        4 tiles, bilinear, mean = std = 0.5); ValueError for settings pyvlm
        does not reproduce or a vision tower that disagrees."""
        preprocessor = {k: v for k, v in preprocessor_config.items() if v is not None}
        _check_steps(preprocessor)
        vision = model_config.get("vision_config") or {}
        config = cls(tile_size=_tile_size(preprocessor),
                     max_image_tiles=preprocessor.get("max_image_tiles", 4),
                     normalization=_normalization(preprocessor),
                     patch_size=vision.get("patch_size") or 14)
        _check_vision_config(config, vision)
        return config


def _tile_size(preprocessor: Mapping) -> int:
    size = dict(preprocessor.get("size") or {"height": 224, "width": 224})
    if set(size) != {"height", "width"} or size["height"] != size["width"]:
        raise ValueError(f"Llama-3.2-Vision needs a square size {{height, width}}, got {size}")
    return size["height"]


def _normalization(preprocessor: Mapping) -> Normalization:
    """normalization_of with mllama's defaults (bilinear, 0.5 mean and std)."""
    with_defaults = {"resample": BILINEAR, "image_std": IMAGENET_STANDARD, **preprocessor}
    mean = tuple(float(m) for m in with_defaults.get("image_mean", IMAGENET_STANDARD))
    return normalization_of(with_defaults, mean)


def _check_steps(preprocessor: Mapping) -> None:
    for flag, why in (("do_resize", "images are resized to the tiled canvas"),
                      ("do_pad", "images are padded to the tiled canvas"),
                      ("do_convert_rgb", "pyvlm decodes images to RGB")):
        if not preprocessor.get(flag, True):
            raise ValueError(f"{flag}=False is not supported ({why})")


def _check_vision_config(config: MllamaImageConfig, vision: Mapping) -> None:
    """The tower embeds tiles of its image_size and one aspect-ratio entry
    per supported grid: both must be the processor's."""
    if vision.get("image_size", config.tile_size) != config.tile_size:
        raise ValueError(f"preprocessor tile size {config.tile_size} differs from the vision "
                         f"tower's image_size {vision['image_size']}")
    if vision.get("max_num_tiles", config.max_image_tiles) != config.max_image_tiles:
        raise ValueError(f"preprocessor max_image_tiles {config.max_image_tiles} differs from "
                         f"the vision tower's max_num_tiles {vision['max_num_tiles']}")
    ratios = [list(r) for r in supported_aspect_ratios(config.max_image_tiles)]
    model_ratios = vision.get("supported_aspect_ratios")
    if model_ratios is not None and [list(r) for r in model_ratios] != ratios:
        raise ValueError(f"the vision tower's supported_aspect_ratios {model_ratios} differ "
                         f"from the processor's {ratios}")
