"""Reading LLaVA-OneVision's preprocessor_config.json contents (a dict) into
LlavaOnevisionImageConfig's fields, refusing settings pyvlm does not reproduce."""

from typing import Mapping, Optional, Sequence

from .llava_onevision import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Normalization,
                              default_grid_pinpoints)


def config_kwargs(preprocessor: Mapping, vision_image_size: int, vision_patch_size: int,
                  vision_aspect_ratio: str, vision_feature_select_strategy: str,
                  model_pinpoints: Optional[Sequence[Sequence[int]]]) -> dict:
    """LlavaOnevisionImageConfig keyword arguments (see its from_configs)."""
    tile_size = tile_size_of(preprocessor)
    if tile_size != vision_image_size:
        raise ValueError(f"processor tile size {tile_size} differs from the vision tower's "
                         f"image_size {vision_image_size}")
    _check_steps(preprocessor)
    pinpoints = (preprocessor.get("image_grid_pinpoints") or model_pinpoints
                 or default_grid_pinpoints(tile_size))
    mean = tuple(float(m) for m in preprocessor.get("image_mean", OPENAI_CLIP_MEAN))
    return dict(tile_size=tile_size, patch_size=vision_patch_size,
                grid_pinpoints=tuple((int(h), int(w)) for h, w in pinpoints),
                normalization=normalization_of(preprocessor, mean),
                square_fill=tuple(int(m * 255) for m in mean),
                vision_aspect_ratio=vision_aspect_ratio,
                vision_feature_select_strategy=vision_feature_select_strategy)


def tile_size_of(preprocessor: Mapping) -> int:
    """The square tile side: size {height, width} or {shortest_edge}; a
    crop_size, when given, must be the same square."""
    size = dict(preprocessor.get("size") or {"height": 384, "width": 384})
    side = size.get("height", size.get("shortest_edge"))
    if side is None or size.get("width", side) != side:
        raise ValueError(f"LLaVA-OneVision needs a square processor size, got {size}")
    crop = preprocessor.get("crop_size")
    if crop and (crop.get("height", side), crop.get("width", side)) != (side, side):
        raise ValueError(f"crop_size {crop} differs from size {size}")
    return int(side)


def _check_steps(preprocessor: Mapping) -> None:
    if not preprocessor.get("do_resize", True):
        raise ValueError("do_resize=False is not supported (tiles must be resized)")
    if preprocessor.get("do_center_crop"):
        raise ValueError("do_center_crop is not supported for LLaVA-OneVision")


def normalization_of(preprocessor: Mapping, mean: tuple) -> Normalization:
    """Rescale and normalise settings; disabled steps become identities."""
    do_rescale = preprocessor.get("do_rescale", True)
    do_normalize = preprocessor.get("do_normalize", True)
    std = tuple(float(s) for s in preprocessor.get("image_std", OPENAI_CLIP_STD))
    return Normalization(
        resample=int(preprocessor.get("resample", 3)),
        rescale_factor=float(preprocessor.get("rescale_factor", 1 / 255)) if do_rescale else 1.0,
        mean=mean if do_normalize else (0.0, 0.0, 0.0),
        std=std if do_normalize else (1.0, 1.0, 1.0))
