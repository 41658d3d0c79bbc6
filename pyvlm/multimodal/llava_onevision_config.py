"""Reading LLaVA-OneVision's preprocessor_config.json contents (a dict) into
LlavaOnevisionImageConfig's fields, refusing settings pyvlm does not reproduce."""

from typing import Mapping, Optional, Sequence

from .llava_onevision import OPENAI_CLIP_MEAN, default_grid_pinpoints
from .preprocessor_config import normalization_of, tile_size_of  # noqa: F401 (importers)


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


def _check_steps(preprocessor: Mapping) -> None:
    if not preprocessor.get("do_resize", True):
        raise ValueError("do_resize=False is not supported (tiles must be resized)")
    if preprocessor.get("do_center_crop"):
        raise ValueError("do_center_crop is not supported for LLaVA-OneVision")
