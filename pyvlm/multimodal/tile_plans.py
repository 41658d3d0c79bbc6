"""Tile plans shared by the LLaVA families (LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision): how one image becomes square tower tiles, as plain data.

A tile is a window of the image resized to some size; windows reaching
outside the resized image read zeros (transformers' np.pad and
center_crop padding). An optional square canvas pastes the image on a
fill color first (pad to square). pyvlm.models.llava_pixels turns plans
into pixels with one preprocess_images call per prompt.
Sizes are (height, width).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

Size = Tuple[int, int]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SUPPORTED_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values

# Why a variant's plans hold a square canvas, for the buffer refusal.
_CANVAS_REASONS = {"pad_square": "each image of a multi-image prompt is padded to a square"}


def mean_fill(mean) -> Tuple[int, int, int]:
    """The pad-to-square color: tuple(int(x * 255) for x in image_mean), as
    transformers' LlavaImageProcessor and the LLaVA repo's expand2square use."""
    return tuple(int(m * 255) for m in mean)


def check_resample(resample: int) -> None:
    if resample not in SUPPORTED_RESAMPLE:
        raise ValueError(f"resample {resample} is not supported (only {sorted(SUPPORTED_RESAMPLE)})")


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
    """The image pasted at (top, left) on a side x side canvas of `fill`
    (transformers' pad_to_square, the LLaVA repo's expand2square); the tiles
    are then taken from the canvas."""

    side: int
    top: int
    left: int
    fill: Tuple[int, int, int]


def square_canvas(image_size: Size, fill: Tuple[int, int, int]) -> SquareCanvas:
    """The centered square canvas of an image ((side - h) // 2 offsets)."""
    height, width = image_size
    side = max(height, width)
    return SquareCanvas(side, (side - height) // 2, (side - width) // 2, tuple(fill))


@dataclass(frozen=True)
class ImagePlan:
    """How one image becomes tiles (in order: the model's order) and how
    many placeholder tokens it takes.

    best_resolution: the anyres grid's (height, width), None without a grid;
    grid_shape gives its (rows, columns) of tiles (the tiles after the base
    tile, row by row). feature_crop: (top, bottom, left, right) of the
    grid's feature map that removes the letterbox padding (the model's
    unpad_image), where the family's processor computes it.
    """

    image_size: Size
    tile_size: int
    tiles: Tuple[Tile, ...]
    normalization: Normalization
    num_tokens: int
    variant: str  # names the processing path; part of the image's cache key
    best_resolution: Optional[Size] = None
    canvas: Optional[SquareCanvas] = None
    feature_crop: Optional[Tuple[int, int, int, int]] = None

    @property
    def num_tiles(self) -> int:
        return len(self.tiles)

    @property
    def grid_shape(self) -> Optional[Size]:
        """(rows, columns) of grid tiles, None without a grid."""
        if self.best_resolution is None:
            return None
        height, width = self.best_resolution
        return height // self.tile_size, width // self.tile_size

    @property
    def num_pixel_values(self) -> int:
        """Values of the tower input it becomes: num_tiles x 3 x tile x tile."""
        return self.num_tiles * 3 * self.tile_size ** 2

    @property
    def num_buffer_pixels(self) -> int:
        """Pixels of the largest image preprocessing holds: the square
        canvas, or the largest resized image."""
        canvas = self.canvas.side ** 2 if self.canvas is not None else 0
        return max([canvas] + [h * w for h, w in (tile.resize_hw for tile in self.tiles)])

    def buffer_description(self) -> str:
        height, width = max((tile.resize_hw for tile in self.tiles), key=lambda hw: hw[0] * hw[1])
        if self.canvas is not None and self.canvas.side ** 2 >= height * width:
            side = self.canvas.side
            reason = _CANVAS_REASONS.get(self.variant, "the image is padded to a square first")
            return f"a {side}x{side} square canvas ({reason})"
        return f"a {width}x{height} resized copy"
