"""The size rules of the Hugging Face image processors, in pure Python.

Each function reproduces transformers' arithmetic exactly (integer
truncation, Python rounding, floor division) so that the sizes fed to
pyvlm's preprocessing ops, and the vision token counts derived from them,
match what the reference processors produce. Sizes are (height, width).
"""

import math
from typing import Optional, Tuple

Size = Tuple[int, int]


def shortest_edge_size(height: int, width: int, shortest_edge: int,
                       max_size: Optional[int] = None) -> Size:
    """CLIP-style resize: the short side becomes shortest_edge, the long side
    is truncated proportionally (transformers' get_resize_output_image_size
    with default_to_square=False), optionally capped at max_size."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    if max_size is not None:
        if max_size <= shortest_edge:
            raise ValueError(f"max_size = {max_size} must be strictly greater than the requested "
                             f"size for the smaller edge size = {shortest_edge}")
        if new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def shortest_longest_edge_size(height: int, width: int, shortest_edge: int,
                               longest_edge: Optional[int] = None) -> Size:
    """transformers' get_size_with_aspect_ratio (size dicts holding both
    shortest_edge and longest_edge)."""
    size, raw_size = shortest_edge, None
    if longest_edge is not None:
        min_side, max_side = float(min(height, width)), float(max(height, width))
        if max_side / min_side * size > longest_edge:
            raw_size = longest_edge * min_side / max_side
            size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        long = raw_size if raw_size is not None else size
        return int(long * height / width), size
    long = raw_size if raw_size is not None else size
    return size, int(long * width / height)


def fixed_size(height: int, width: int, size_height: int, size_width: int) -> Size:
    """SigLIP-style resize to a fixed (height, width), whatever the input."""
    return size_height, size_width


def center_crop_top_left(height: int, width: int, crop_height: int, crop_width: int) -> Size:
    """Top-left of transformers' center_crop window in a (height, width) image.

    Negative when the crop is larger than the image: transformers pads with
    zeros, which pyvlm's ops reproduce by filling pixels outside the image.
    """
    return (height - crop_height) // 2, (width - crop_width) // 2


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> Size:
    """Qwen2-VL's resize: both sides multiples of factor, the pixel count in
    [min_pixels, max_pixels], the aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError("absolute aspect ratio must be smaller than 200, got "
                         f"{max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def clip_resize_and_crop(height: int, width: int, shortest_edge: int = 224,
                         crop_size: Size = (224, 224)) -> Tuple[Size, Size]:
    """(resize size, crop top-left) of CLIPImageProcessor's resize + center crop."""
    resized = shortest_edge_size(height, width, shortest_edge)
    return resized, center_crop_top_left(*resized, *crop_size)
