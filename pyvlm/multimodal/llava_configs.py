"""Reading LLaVA-1.5 and LLaVA-NeXT configs (preprocessor_config.json and
config.json contents, or the LLaVA repository's config.json) into
LlavaImageConfig and LlavaNextImageConfig keyword arguments, refusing
settings pyvlm does not reproduce.

Keys missing from preprocessor_config.json take the defaults of the
transformers class its image_processor_type names, as transformers does,
except size and crop_size: those default to the vision tower's image_size
(the classes' 224 could not feed the tower a config.json describes).
"""

import ast
import dataclasses
import re
from typing import Mapping, Tuple

from .llava_next import DEFAULT_GRID_PINPOINTS, LlavaNextImageConfig
from .preprocessor_config import (check_processor_type, checked_normalization, cls_tokens_of,
                                  mean_of, pinpoints_of, tile_size_of)
from .tile_plans import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Size, mean_fill

# The class attributes of transformers' image processors (PIL backend), but
# sizes: the shortest edge (None: the tower's image_size) and a crop or not.
_CLIP_DEFAULTS = dict(size=None, crop_size=None, do_resize=True, do_center_crop=True, resample=3,
                      image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
PROCESSOR_DEFAULTS = {
    "CLIPImageProcessor": dict(_CLIP_DEFAULTS, do_pad=False),  # PilBackend's pad: a no-op here
    "LlavaImageProcessor": dict(_CLIP_DEFAULTS, do_pad=False),
    "LlavaNextImageProcessor": _CLIP_DEFAULTS,
    "SiglipImageProcessor": dict(size=None, do_resize=True, do_center_crop=False, resample=3,
                                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                                 do_pad=False),
}
_SQUARE_SIZE = {"SiglipImageProcessor"}  # size defaults to {height, width}
LLAVA_TYPES = ("CLIPImageProcessor", "LlavaImageProcessor", "SiglipImageProcessor")
DEFAULT_VISION = {"image_size": 336, "patch_size": 14}  # transformers' default LLaVA tower
PIL_DEFAULT_RESAMPLE = 3  # Image.resize without a filter: bicubic (Pillow >= 7) for RGB
ANYRES_RULES = ("transformers", "llava_repo")


def with_defaults(preprocessor: Mapping, processor_type: str, image_size: int) -> dict:
    """The preprocessor's keys over its class's defaults (None counts as
    missing), sizes as dicts the way transformers' get_size_dict reads them."""
    given = {key: value for key, value in preprocessor.items() if value is not None}
    settings = {**PROCESSOR_DEFAULTS[processor_type], **given}
    default_size = size_dict(image_size, square=processor_type in _SQUARE_SIZE)
    settings["size"] = size_dict(settings["size"] or default_size, square=False)
    if "crop_size" in settings:
        settings["crop_size"] = size_dict(settings["crop_size"] or image_size, square=True)
    return settings


def size_dict(size, square: bool) -> dict:
    """An int is a shortest edge (these processors' default_to_square=False)
    or, for crop_size, a square; a pair is (height, width)."""
    if isinstance(size, Mapping):
        return dict(size)
    if isinstance(size, int):
        return {"height": size, "width": size} if square else {"shortest_edge": size}
    height, width = size
    return {"height": int(height), "width": int(width)}


def vision_of(model_config: Mapping) -> Tuple[int, int, int]:
    """(image_size, patch_size, CLS tokens) of config.json's vision tower."""
    vision = {**DEFAULT_VISION, **(model_config.get("vision_config") or {})}
    return int(vision["image_size"]), int(vision["patch_size"]), cls_tokens_of(vision)


def _check_tile(tile_size: int, image_size: int) -> None:
    if tile_size != image_size:
        raise ValueError(f"processor tile size {tile_size} differs from the vision tower's "
                         f"image_size {image_size}")


def llava_next_kwargs(preprocessor: Mapping, model_config: Mapping) -> dict:
    """LlavaNextImageConfig keyword arguments from transformers' configs.

    do_resize and do_center_crop may take any value: the tiles already have
    the crop size, so the per-tile resize and crop are identities. Two keys
    transformers does not have serve checkpoints converted from the LLaVA
    repository's layout: anyres_rules "llava_repo" (its process_anyres_image
    and unpad_image: the pinpoints, in both configs, are its (width, height)
    pairs) and base_tile, which may only be "squash" (both squash)."""
    check_processor_type(preprocessor, "LLaVA-NeXT", ("LlavaNextImageProcessor",))
    image_size, patch_size, num_cls = vision_of(model_config)
    settings = with_defaults(preprocessor, "LlavaNextImageProcessor", image_size)
    tile_size = tile_size_of(settings, "LLaVA-NeXT")
    _check_tile(tile_size, image_size)
    _check_base_tile(settings.get("base_tile", "squash"))
    kwargs = dict(tile_size=tile_size, patch_size=patch_size,
                  grid_pinpoints=pinpoints_of(settings, model_config, DEFAULT_GRID_PINPOINTS),
                  normalization=checked_normalization(settings),
                  vision_feature_select_strategy=model_config.get(
                      "vision_feature_select_strategy", "default"),
                  num_cls_tokens=num_cls)
    rules = settings.get("anyres_rules", "transformers")
    if rules not in ANYRES_RULES:
        raise ValueError(f"anyres_rules {rules!r} is not one of {ANYRES_RULES}")
    return as_llava_repo(kwargs) if rules == "llava_repo" else kwargs


def _check_base_tile(base_tile: str) -> None:
    if base_tile != "squash":
        raise ValueError(f"base_tile {base_tile!r} is not supported: transformers' LLaVA-NeXT and "
                         f"the LLaVA repository both squash the image to the tile ('squash')")


def as_llava_repo(kwargs: dict) -> dict:
    """LlavaNextImageConfig keyword arguments for the LLaVA repository's
    process_anyres_image given its (width, height) pinpoints: pinpoints
    swapped to pyvlm's (height, width), order kept (it breaks
    select_best_resolution's ties); Pillow's default filter, bicubic, for
    the squash and the grid resize (the processor's own resize is then an
    identity); unpad_image's int()."""
    return dict(kwargs, grid_pinpoints=tuple((w, h) for h, w in kwargs["grid_pinpoints"]),
                normalization=dataclasses.replace(kwargs["normalization"],
                                                  resample=PIL_DEFAULT_RESAMPLE),
                truncate_unpad=True)


def llava_kwargs(preprocessor: Mapping, model_config: Mapping) -> dict:
    """LlavaImageConfig keyword arguments from transformers' configs: a
    CLIPImageProcessor ("square"), a LlavaImageProcessor (do_pad: "pad") or
    a SiglipImageProcessor (a fixed resize, no crop). pad_to_square, a key
    transformers does not have, pads with any of them: the LLaVA
    repository's image_aspect_ratio "pad" (expand2square), for checkpoints
    converted from its layout."""
    processor_type = check_processor_type(preprocessor, "LLaVA", LLAVA_TYPES)
    image_size, patch_size, num_cls = vision_of(model_config)
    settings = with_defaults(preprocessor, processor_type, image_size)
    pad = bool(settings.get("pad_to_square")) or (
        processor_type == "LlavaImageProcessor" and settings["do_pad"])
    return dict(clip_processor_kwargs(settings, image_size), patch_size=patch_size,
                image_aspect_ratio="pad" if pad else "square", num_cls_tokens=num_cls,
                vision_feature_select_strategy=model_config.get("vision_feature_select_strategy",
                                                                "default"))


def clip_processor_kwargs(settings: Mapping, image_size: int) -> dict:
    """Resize, crop, normalisation and pad color of a CLIP-style processor
    (resize, optional center crop, rescale, normalise) whose tiles are
    image_size squares."""
    if not settings["do_resize"]:
        raise ValueError("do_resize=False is not supported (tiles must be resized)")
    size = dict(settings["size"])
    do_crop = bool(settings["do_center_crop"])
    crop = dict(settings.get("crop_size") or {}) if do_crop else {}
    tile = (crop.get("height"), crop.get("width")) if do_crop else (size.get("height"),
                                                                      size.get("width"))
    if tile != (image_size, image_size):
        raise ValueError(f"the processor's tiles are {tile} (height, width), not the vision "
                         f"tower's {image_size} x {image_size} (size {size}, crop_size {crop})")
    return dict(tile_size=image_size, resize=_resize_rule(size), center_crop=do_crop,
                normalization=checked_normalization(settings),
                square_fill=mean_fill(mean_of(settings)))


def _resize_rule(size: Mapping):
    """An int (shortest edge) or a (height, width)."""
    if set(size) == {"shortest_edge"}:
        return int(size["shortest_edge"])
    if set(size) == {"height", "width"}:
        return int(size["height"]), int(size["width"])
    raise ValueError(f"processor size {size} is not supported ({{shortest_edge}} or "
                     f"{{height, width}} only)")


def llava_repo_kwargs(llava_config: Mapping, clip_preprocessor: Mapping, image_size: int,
                      patch_size: int) -> dict:
    """LlavaImageConfig keyword arguments for a checkpoint in the LLaVA
    repository's layout (see LlavaImageConfig.from_llava_repo)."""
    settings = with_defaults(clip_preprocessor, "CLIPImageProcessor", image_size)
    aspect = llava_config.get("image_aspect_ratio")
    aspect = aspect if aspect in ("pad", "anyres") else "square"  # process_images' fallback
    kwargs = dict(clip_processor_kwargs(settings, image_size), patch_size=patch_size,
                  image_aspect_ratio=aspect, num_cls_tokens=1,
                  vision_feature_select_strategy=_repo_strategy(llava_config))
    if aspect == "anyres":
        if kwargs["resize"] != image_size:
            raise ValueError(f"anyres needs size {{'shortest_edge': {image_size}}} (the crop "
                             f"size), got {settings['size']}")
        kwargs["anyres"] = _repo_anyres(llava_config, kwargs)
    return kwargs


def _repo_strategy(llava_config: Mapping) -> str:
    select = llava_config.get("mm_vision_select_feature", "patch")
    strategies = {"patch": "default", "cls_patch": "full"}
    if select not in strategies:
        raise ValueError(f"mm_vision_select_feature {select!r} is not one of {sorted(strategies)}")
    return strategies[select]


def _repo_anyres(llava_config: Mapping, kwargs: dict) -> LlavaNextImageConfig:
    """process_anyres_image, features merged "spatial_unpad" (llava-v1.6)."""
    merge = llava_config.get("mm_patch_merge_type", "flat")
    if merge != "spatial_unpad":
        raise ValueError(f"anyres with mm_patch_merge_type {merge!r} is not supported "
                         f"(only 'spatial_unpad', the llava-v1.6 layout)")
    pinpoints = repo_pinpoints(llava_config.get("image_grid_pinpoints"), kwargs["tile_size"])
    return LlavaNextImageConfig(**as_llava_repo(dict(
        tile_size=kwargs["tile_size"], patch_size=kwargs["patch_size"], grid_pinpoints=pinpoints,
        normalization=kwargs["normalization"],
        vision_feature_select_strategy=kwargs["vision_feature_select_strategy"],
        num_cls_tokens=kwargs["num_cls_tokens"])))


def repo_pinpoints(pinpoints, tile_size: int) -> Tuple[Size, ...]:
    """The repository's image_grid_pinpoints as written: a list, its string,
    or (LLaVA-NeXT's repository) "(1x1),...,(3x3)", every grid from the first
    to the last, times the tile. Pairs are its (width, height), kept so."""
    if pinpoints is None:
        raise ValueError("anyres needs image_grid_pinpoints")
    if isinstance(pinpoints, str) and "x" in pinpoints:
        grids = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
        (first_i, first_j), (last_i, last_j) = [tuple(map(int, g)) for g in (grids[0], grids[-1])]
        return tuple((i * tile_size, j * tile_size) for i in range(first_i, last_i + 1)
                     for j in range(first_j, last_j + 1))
    if isinstance(pinpoints, str):
        pinpoints = ast.literal_eval(pinpoints)
    return tuple((int(first), int(second)) for first, second in pinpoints)
