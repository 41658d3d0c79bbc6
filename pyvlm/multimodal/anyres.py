"""LLaVA's "anyres" geometry, shared by LLaVA-NeXT, LLaVA-OneVision and the
LLaVA repository's layout, without torch.

An image picks the grid pinpoint keeping the most of its pixels
(select_best_resolution), is resized into it keeping its aspect ratio
(patch_output_size), centered on zeros and cut into tile x tile tiles row
by row, after a base tile of the whole image squashed to tile x tile. The
model unpads the grid's feature map (unpadding_crop) and ends each feature
row with an image_newline. Reproduces transformers' image_processing_utils
and modeling_llava_next; sizes and pinpoints are (height, width).
"""

import math
from typing import Sequence, Tuple

from .tile_plans import Size, Tile


def select_best_resolution(image_size: Size, pinpoints: Sequence[Size]) -> Size:
    """transformers' select_best_resolution: the pinpoint keeping the most
    original pixels, ties broken by the least wasted area (first wins).

    The LLaVA repository reads pinpoints as (width, height): pass them
    swapped to reproduce it (the arithmetic is the same, so is the order)."""
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
    """transformers' get_patch_output_size (the LLaVA repo's
    resize_and_pad_image): the image resized to fit target, aspect kept."""
    height, width = image_size
    target_height, target_width = target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def unpadding_crop(image_size: Size, current_size: Size,
                   truncate: bool = False) -> Tuple[int, int, int, int]:
    """The crop (top, bottom, left, right) of a [current_size] feature map
    that removes the letterbox padding anyres added around an image of
    image_size (the model's unpad_image).

    New sizes are transformers' int(round(x, 7)), or with truncate the LLaVA
    repository's int(x), which makes 23 of a product like 23.999999999."""
    height, width = image_size
    rows, cols = current_size
    if width / height > cols / rows:
        scaled = height * (cols / width)
        new_height = int(scaled) if truncate else int(round(scaled, 7))
        padding = (rows - new_height) // 2
        return padding, rows - padding, 0, cols
    scaled = width * (rows / height)
    new_width = int(scaled) if truncate else int(round(scaled, 7))
    padding = (cols - new_width) // 2
    return 0, rows, padding, cols - padding


def unpadded_feature_grid(image_size: Size, grid_rows: int, grid_cols: int,
                          truncate: bool = False) -> Size:
    """(rows, cols) of the feature grid once the padding is removed."""
    top, bottom, left, right = unpadding_crop(image_size, (grid_rows, grid_cols), truncate)
    return bottom - top, right - left


def anyres_grid_shape(image_size: Size, pinpoints: Sequence[Size], tile_size: int) -> Size:
    """(rows, columns) of tiles of the best resolution."""
    height, width = select_best_resolution(image_size, pinpoints)
    return height // tile_size, width // tile_size


def num_anyres_tiles(image_size: Size, pinpoints: Sequence[Size], tile_size: int) -> int:
    """Grid tiles plus the base (whole image) tile."""
    height, width = select_best_resolution(image_size, pinpoints)
    return math.ceil(height / tile_size) * math.ceil(width / tile_size) + 1


def check_pinpoints(pinpoints: Sequence[Size], tile_size: int) -> None:
    """Pinpoints must be positive multiples of the tile (whole tiles)."""
    if not pinpoints:
        raise ValueError("anyres needs at least one grid pinpoint")
    for pin in pinpoints:
        if min(pin) <= 0 or pin[0] % tile_size or pin[1] % tile_size:
            raise ValueError(f"grid pinpoint {tuple(pin)} is not a multiple of the tile {tile_size}")


def grid_tiles(image_size: Size, best: Size, tile_size: int) -> Tuple[Tile, ...]:
    """The tiles of the image resized into best (aspect kept), centered on
    zeros (padding (best - resized) // 2 before), row by row."""
    resized = patch_output_size(image_size, best)
    top, left = (best[0] - resized[0]) // 2, (best[1] - resized[1]) // 2
    return tuple(Tile(resized, (row - top, col - left))
                 for row in range(0, best[0], tile_size) for col in range(0, best[1], tile_size))


def squashed_tile(tile_size: int) -> Tile:
    """The base tile: the whole image resized to tile x tile, aspect not kept."""
    return Tile((tile_size, tile_size), (0, 0))


def grid_feature_crop(image_size: Size, best: Size, tile_size: int, features_per_side: int,
                      truncate: bool = False) -> Tuple[int, int, int, int]:
    """unpadding_crop of the grid's feature map (features_per_side per tile)."""
    rows, cols = (best[0] // tile_size, best[1] // tile_size)
    return unpadding_crop(image_size, (rows * features_per_side, cols * features_per_side),
                          truncate)


def num_grid_tokens(feature_crop: Tuple[int, int, int, int]) -> int:
    """The unpadded grid's features plus one image_newline per feature row."""
    top, bottom, left, right = feature_crop
    rows, cols = bottom - top, right - left
    return rows * cols + rows
