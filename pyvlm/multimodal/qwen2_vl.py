"""Qwen2-VL and Qwen2.5-VL images without torch: resize plans, token counts
and M-RoPE prompt positions.

Reproduces transformers 5.24 exactly:
- Qwen2VLImageProcessorPil: each image is resized (smart_resize) so both
  sides are multiples of patch_size * merge_size and its area lies about in
  [min_pixels, max_pixels], then rescaled, normalised, repeated
  temporal_patch_size times and cut into (h / p) * (w / p) patch rows.
- Qwen2VLProcessor: an image expands into grid_h * grid_w / merge_size**2
  image-pad tokens (one per merged 2 x 2 block of patches).
- Qwen2VLModel.get_rope_index: text tokens sit at the same position on all
  three rows; an image's tokens at (start, start + row, start + column) of
  its merged grid; the text after it restarts at start + max(rows, columns).

Qwen2.5-VL is the same for still images: transformers maps qwen2_5_vl to
this image processor (its checkpoints name Qwen2VLImageProcessor), its
processor counts tokens the same way, and its get_rope_index differs only by
the temporal spacing tokens_per_second * second_per_grid_ts, which 5.24
applies to videos only (an image has a single temporal position anyway).
Sizes are (height, width).
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from pyvlm.scheduling.positions import MropePositions
from pyvlm.multimodal import image_sizes
from pyvlm.multimodal.llava_onevision import SUPPORTED_RESAMPLE, Normalization
from pyvlm.multimodal.llava_onevision_config import normalization_of
from pyvlm.multimodal.processor import ResizedCopyBuffer, check_buffers, refuse_overrides

Size = Tuple[int, int]

MAX_ASPECT_RATIO = 200  # smart_resize refuses a longer side over 200 x the shorter
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
OVERRIDE_KEYS = ("min_pixels", "max_pixels", "size")
SIZE_KEYS = ("shortest_edge", "longest_edge")  # transformers 5's names of min/max_pixels


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> Size:
    """The size Qwen2-VL resizes a (height, width) image to: both sides
    multiples of factor, rounded half to even (Python's round) first, then
    scaled down (floor) over max_pixels or up (ceil) under min_pixels.

    An image under 28 px on a side is scaled up like any other; ValueError
    (client-safe: it names the size and the limit) for an aspect ratio over
    200:1, which transformers refuses too.
    """
    if min(height, width) <= 0:
        raise ValueError(f"the image is {width}x{height} pixels: it has no pixels")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"the image is {width}x{height} pixels, an aspect ratio of "
                         f"{ratio:.1f}:1; Qwen2-VL takes images up to {MAX_ASPECT_RATIO}:1")
    return image_sizes.smart_resize(height, width, factor, min_pixels, max_pixels)


@dataclass(frozen=True)
class Qwen2VLImagePlan(ResizedCopyBuffer):
    """How one image becomes patch rows and how many tokens it takes."""

    image_size: Size
    resized_size: Size
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    normalization: Normalization

    @property
    def grid_thw(self) -> Tuple[int, int, int]:
        """(frames, patch rows, patch columns): transformers' image_grid_thw."""
        height, width = self.resized_size
        return 1, height // self.patch_size, width // self.patch_size

    @property
    def llm_grid_hw(self) -> Size:
        """(rows, columns) of the merged grid: one token each."""
        _, rows, cols = self.grid_thw
        return rows // self.merge_size, cols // self.merge_size

    @property
    def num_patches(self) -> int:
        frames, rows, cols = self.grid_thw
        return frames * rows * cols

    @property
    def num_tokens(self) -> int:
        """Image-pad tokens the image expands into."""
        return self.num_patches // self.merge_size ** 2

    @property
    def variant(self) -> str:
        """Names the resize: the same pixels resized differently (other
        min/max_pixels) never share a cache entry."""
        height, width = self.resized_size
        return f"qwen2_vl:{height}x{width}"

    @property
    def num_pixel_values(self) -> int:
        """Values of the tower input: one row of 3 * T * p * p per patch."""
        return self.num_patches * 3 * self.temporal_patch_size * self.patch_size ** 2



@dataclass(frozen=True)
class Qwen2VLImageConfig:
    """The preprocessor settings that shape Qwen2-VL / Qwen2.5-VL images
    (transformers' Qwen2VLImageProcessor defaults). Plain data: build it with
    `from_hf_configs` from preprocessor_config.json and config.json contents."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    normalization: Normalization = Normalization()

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            _check_positive_int(name, getattr(self, name))
        _check_pixel_bounds(self.min_pixels, self.max_pixels)
        if self.normalization.resample not in SUPPORTED_RESAMPLE:
            raise ValueError(f"resample {self.normalization.resample} is not supported "
                             f"(only {sorted(SUPPORTED_RESAMPLE)})")

    @property
    def factor(self) -> int:
        """Both resized sides are multiples of this (one merged block)."""
        return self.patch_size * self.merge_size

    def plan(self, image_size: Size) -> Qwen2VLImagePlan:
        """The resize of one image (ValueError for a refused aspect ratio)."""
        resized = smart_resize(*image_size, self.factor, self.min_pixels, self.max_pixels)
        return Qwen2VLImagePlan(tuple(image_size), resized, self.patch_size,
                                self.temporal_patch_size, self.merge_size, self.normalization)

    def plan_prompt(self, image_sizes: Sequence[Size],
                    max_buffer_pixels: Optional[int] = None) -> List[Qwen2VLImagePlan]:
        """Plans of one prompt's images, in order (each is planned alone);
        ValueError naming the image for a refused aspect ratio; ImageBudgetError
        for one whose resized copy exceeds max_buffer_pixels."""
        plans = []
        for index, size in enumerate(image_sizes, start=1):
            try:
                plans.append(self.plan(size))
            except ValueError as error:
                raise ValueError(f"image {index} of the prompt: {error}") from None
        if max_buffer_pixels is not None:
            check_buffers(plans, max_buffer_pixels)
        return plans

    def placeholder_text(self, image_token: str) -> str:
        """What Qwen2-VL's chat template writes per image (image_token is
        <|image_pad|>, expanded later into the image's tokens)."""
        return VISION_START + image_token + VISION_END

    def with_overrides(self, mm_processor_kwargs: Optional[Mapping[str, Any]]
                       ) -> "Qwen2VLImageConfig":
        """This config with min_pixels / max_pixels replaced, as transformers
        takes them at call time: `size` {shortest_edge, longest_edge} (both),
        and min_pixels / max_pixels over it. ValueError names a bad one."""
        if not mm_processor_kwargs:
            return self
        refuse_overrides("Qwen2-VL", mm_processor_kwargs, OVERRIDE_KEYS)
        bounds = (self.min_pixels, self.max_pixels)
        if mm_processor_kwargs.get("size") is not None:
            bounds = _size_bounds(mm_processor_kwargs["size"], "mm_processor_kwargs size")
        min_pixels, max_pixels = (
            _override_int(mm_processor_kwargs, key, default)
            for key, default in zip(("min_pixels", "max_pixels"), bounds))
        _check_pixel_bounds(min_pixels, max_pixels, "mm_processor_kwargs: ")
        return dataclasses.replace(self, min_pixels=min_pixels, max_pixels=max_pixels)

    def prompt_positions(self, prompt_ids: Sequence[int], spans: Sequence[Tuple[int, int]],
                         plans: Sequence[Qwen2VLImagePlan]) -> MropePositions:
        """The M-RoPE positions of an expanded prompt (get_rope_index);
        spans[i] = (offset, length) of image i's image-pad run."""
        if len(spans) != len(plans):
            raise ValueError(f"{len(spans)} image spans but {len(plans)} plans")
        return mrope_prompt_positions(len(prompt_ids), spans, [p.llm_grid_hw for p in plans])

    @classmethod
    def from_hf_configs(cls, preprocessor_config: Mapping,
                        model_config: Mapping) -> "Qwen2VLImageConfig":
        """From preprocessor_config.json and config.json contents (dicts), as
        Qwen/Qwen2-VL-*-Instruct and Qwen/Qwen2.5-VL-* ship them: min_pixels /
        max_pixels at the top level and / or transformers 5's size
        {shortest_edge, longest_edge}. Null values mean the default, as in
        transformers; ValueError for settings pyvlm does not reproduce."""
        preprocessor = {k: v for k, v in preprocessor_config.items() if v is not None}
        _check_steps(preprocessor)
        shape = {name: _int_field(preprocessor, name, default) for name, default in
                 (("patch_size", 14), ("temporal_patch_size", 2), ("merge_size", 2))}
        _check_vision_config(shape, model_config.get("vision_config") or {})
        min_pixels, max_pixels = _preprocessor_bounds(preprocessor)
        mean = tuple(float(m) for m in preprocessor.get("image_mean", Normalization().mean))
        return cls(**shape, min_pixels=min_pixels, max_pixels=max_pixels,
                   normalization=normalization_of(preprocessor, mean))


def mrope_prompt_positions(num_tokens: int, spans: Sequence[Tuple[int, int]],
                           llm_grids: Sequence[Size]) -> MropePositions:
    """get_rope_index for a prompt of num_tokens whose image i occupies
    spans[i] = (offset, length) with a merged grid llm_grids[i] = (rows,
    cols): text at st + arange on all rows, images at st + (0, row, col),
    delta = max position + 1 - num_tokens (0 without images)."""
    rows: Tuple[list, list, list] = ([], [], [])
    next_position, cursor = 0, 0
    for (offset, length), (grid_rows, grid_cols) in zip(spans, llm_grids):
        if offset < cursor or length != grid_rows * grid_cols or offset + length > num_tokens:
            raise ValueError(f"image span ({offset}, {length}) overlaps, is out of order, "
                             f"leaves the {num_tokens}-token prompt or differs from its "
                             f"{grid_rows}x{grid_cols} grid")
        next_position = _append_text(rows, next_position, offset - cursor)
        next_position = _append_image(rows, next_position, grid_rows, grid_cols)
        cursor = offset + length
    next_position = _append_text(rows, next_position, num_tokens - cursor)
    # Positions never decrease segment to segment and every segment ends at
    # next_position - 1, so that is the prompt's maximum (get_rope_index's max).
    return MropePositions(tuple(tuple(row) for row in rows), next_position - num_tokens)


def _append_text(rows, start: int, count: int) -> int:
    for row in rows:
        row.extend(range(start, start + count))
    return start + count


def _append_image(rows, start: int, grid_rows: int, grid_cols: int) -> int:
    temporal, height, width = rows
    temporal.extend([start] * (grid_rows * grid_cols))  # an image is one frame: t = 0
    for row in range(start, start + grid_rows):
        height.extend([row] * grid_cols)
        width.extend(range(start, start + grid_cols))
    return start + max(grid_rows, grid_cols)


def _check_positive_int(name: str, value, prefix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{prefix}{name} must be a positive integer, got {value!r}")


def _check_pixel_bounds(min_pixels, max_pixels, prefix: str = "") -> None:
    _check_positive_int("min_pixels", min_pixels, prefix)
    _check_positive_int("max_pixels", max_pixels, prefix)
    if min_pixels > max_pixels:
        raise ValueError(f"{prefix}min_pixels ({min_pixels}) is larger than max_pixels "
                         f"({max_pixels})")


def _override_int(kwargs: Mapping, key: str, default: int) -> int:
    value = kwargs.get(key)
    return default if value is None else value


def _size_bounds(size, where: str) -> Size:
    """(min_pixels, max_pixels) of a size {shortest_edge, longest_edge}."""
    if not isinstance(size, Mapping):
        raise ValueError(f"{where} must be an object with {' and '.join(SIZE_KEYS)}, got {size!r}")
    present = {k for k, v in size.items() if v is not None}
    if present != set(SIZE_KEYS):
        raise ValueError(f"{where} must give exactly {' and '.join(SIZE_KEYS)} (pixel counts), "
                         f"got {sorted(size)}")
    return size["shortest_edge"], size["longest_edge"]


def _preprocessor_bounds(preprocessor: Mapping) -> Size:
    """transformers' __init__: size (default {3136, 1003520}), then a
    top-level min_pixels / max_pixels replacing shortest / longest_edge."""
    size = dict(preprocessor.get("size") or dict(zip(SIZE_KEYS, (DEFAULT_MIN_PIXELS,
                                                                  DEFAULT_MAX_PIXELS))))
    for key, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if key in preprocessor:
            size[size_key] = preprocessor[key]
            size.pop(key, None)
    return _size_bounds(size, "preprocessor size")


def _int_field(preprocessor: Mapping, name: str, default: int) -> int:
    value = preprocessor.get(name, default)
    _check_positive_int(name, value)
    return value


def _check_steps(preprocessor: Mapping) -> None:
    if not preprocessor.get("do_resize", True):
        raise ValueError("do_resize=False is not supported (Qwen2-VL images must be resized "
                         "to multiples of the patch grid)")
    if not preprocessor.get("do_convert_rgb", True):
        raise ValueError("do_convert_rgb=False is not supported (pyvlm decodes images to RGB)")


def _check_vision_config(shape: Mapping, vision: Mapping) -> None:
    """The tower must cut and merge patches as the processor does."""
    model_names = {"patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size",
                   "merge_size": "spatial_merge_size"}
    for name, model_name in model_names.items():
        model_value = vision.get(model_name, shape[name])
        if model_value != shape[name]:
            raise ValueError(f"preprocessor {name} {shape[name]} differs from the vision "
                             f"tower's {model_name} {model_value}")
