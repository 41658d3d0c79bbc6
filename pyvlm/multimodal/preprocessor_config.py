"""Reading a Hugging Face preprocessor_config.json's contents (a dict): the
pieces several families share, refusing what pyvlm does not reproduce."""

from typing import Mapping, Optional, Sequence, Tuple

from .tile_plans import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Normalization, Size, check_resample


def tile_size_of(preprocessor: Mapping, family: str = "LLaVA-OneVision",
                 default_size: Optional[Mapping] = None) -> int:
    """The square tile side: size {height, width} or {shortest_edge}; a
    crop_size, when given, must be the same square."""
    size = dict(preprocessor.get("size") or default_size or {"height": 384, "width": 384})
    side = size.get("height", size.get("shortest_edge"))
    if side is None or size.get("width", side) != side:
        raise ValueError(f"{family} needs a square processor size, got {size}")
    crop = preprocessor.get("crop_size")
    if crop and (crop.get("height", side), crop.get("width", side)) != (side, side):
        raise ValueError(f"crop_size {crop} differs from size {size}")
    return int(side)


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


def mean_of(preprocessor: Mapping) -> Tuple[float, float, float]:
    """image_mean (also the pad-to-square color's source), CLIP's by default."""
    return tuple(float(m) for m in preprocessor.get("image_mean", OPENAI_CLIP_MEAN))


def checked_normalization(preprocessor: Mapping) -> Normalization:
    """normalization_of with the resampling filter checked."""
    normalization = normalization_of(preprocessor, mean_of(preprocessor))
    check_resample(normalization.resample)
    return normalization


def pinpoints_of(preprocessor: Mapping, model_config: Mapping,
                 default: Sequence[Sequence[int]]) -> Tuple[Size, ...]:
    """The grid pinpoints: the processor tiles with its own, the model reads
    the grid from config.json's; both given and different is refused."""
    processor_pins = preprocessor.get("image_grid_pinpoints")
    model_pins = model_config.get("image_grid_pinpoints")
    if processor_pins and model_pins and _pairs(processor_pins) != _pairs(model_pins):
        raise ValueError(f"preprocessor image_grid_pinpoints {processor_pins} differ from the "
                         f"model's {model_pins}")
    return _pairs(processor_pins or model_pins or default)


def _pairs(pinpoints: Sequence[Sequence[int]]) -> Tuple[Size, ...]:
    return tuple((int(height), int(width)) for height, width in pinpoints)


def check_processor_type(preprocessor: Mapping, family: str, accepted: Sequence[str]) -> str:
    """image_processor_type without its Fast/Pil suffix; ValueError for one
    of another family (its pixels would not be these)."""
    name = preprocessor.get("image_processor_type") or accepted[0]
    base = name[:-4] if name.endswith("Fast") else name[:-3] if name.endswith("Pil") else name
    if base not in accepted:
        raise ValueError(f"{family} serves preprocessors of type {', '.join(accepted)}, "
                         f"not {name}")
    return base


def cls_tokens_of(vision_config: Mapping) -> int:
    """Extra tower outputs before the patches: CLIP's CLS token (1), none
    for SigLIP (transformers' num_additional_image_tokens)."""
    model_type = vision_config.get("model_type", "clip_vision_model")
    counts = {"clip_vision_model": 1, "siglip_vision_model": 0}
    if model_type not in counts:
        raise ValueError(f"vision tower {model_type!r} is not supported (only {sorted(counts)})")
    return counts[model_type]
