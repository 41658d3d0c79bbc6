"""LLaVA-NeXT/OneVision "anyres" tile geometry, in pure Python (no torch).

Reproduces transformers' select_best_resolution, image_size_to_num_patches
and unpad_image arithmetic (sizes are (height, width)) so the engine can
count an image's tiles and tokens without the model.
"""

import math
from typing import Sequence, Tuple

Size = Tuple[int, int]


def select_best_resolution(image_size: Size, pinpoints: Sequence[Sequence[int]]) -> Size:
    """The (height, width) grid resolution that keeps the most of the image
    and, on ties, wastes the fewest pixels."""
    original_height, original_width = image_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for height, width in pinpoints:
        scale = min(width / original_width, height / original_height)
        downscaled = int(original_width * scale) * int(original_height * scale)
        effective = min(downscaled, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            best_fit, max_effective, min_wasted = (height, width), effective, wasted
    return best_fit


def anyres_grid_shape(image_size: Size, pinpoints, tile_size: int) -> Size:
    """(rows, columns) of tiles of the best resolution."""
    height, width = select_best_resolution(image_size, pinpoints)
    return height // tile_size, width // tile_size


def num_anyres_tiles(image_size: Size, pinpoints, tile_size: int) -> int:
    """Grid tiles plus the base (whole image) tile."""
    height, width = select_best_resolution(image_size, pinpoints)
    return math.ceil(height / tile_size) * math.ceil(width / tile_size) + 1


def unpadded_size(image_size: Size, current_size: Size) -> Tuple[int, int, int, int]:
    """The crop (top, bottom, left, right) of a [current_size] feature map
    that removes the letterbox padding of an image of image_size."""
    original_height, original_width = image_size
    current_height, current_width = current_size
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return padding, current_height - padding, 0, current_width
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return 0, current_height, padding, current_width - padding


def max_tiles_of(vision_aspect_ratio: str) -> int:
    """9 for "anyres_max_9": the feature area, in base tiles, kept before
    bilinear downsampling."""
    return int(vision_aspect_ratio.strip("anyres_max_"))


def downsampled_size(height: int, width: int, features_per_side: int,
                     max_tiles: int) -> Size:
    """The feature map size after OneVision's max-tiles downsampling
    (unchanged unless the area exceeds max_tiles tiles by more than 10%)."""
    ratio = math.sqrt(height * width / (max_tiles * features_per_side ** 2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width
