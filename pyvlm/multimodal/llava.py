"""LLaVA-1.5 images without torch: preprocessing plans and token counts.

Reproduces transformers 5.25's LlavaForConditionalGeneration
(llava-hf/llava-1.5-7b-hf) exactly: one tile per image, made by its
preprocessor's PIL processor:
- CLIPImageProcessorPil ("square"): resize the shortest edge to size
  (bicubic, the long edge truncated), center crop to crop_size;
- LlavaImageProcessorPil with do_pad ("pad"): first paste the image centered
  ((side - h) // 2 offsets) on a square of tuple(int(x * 255) for x in
  image_mean), then as CLIP;
- SiglipImageProcessorPil: a fixed (height, width) resize, no crop.
LlavaProcessor counts (crop // patch)^2 placeholders, + 1 for the CLS
(num_additional_image_tokens), - 1 for vision_feature_select_strategy
"default".

Checkpoints in the LLaVA repository's own layout (haotian-liu/LLaVA,
llava/mm_utils.py process_images) map onto the same class with
`from_llava_repo` (or, converted to transformers' layout, through
from_hf_configs with the keys pad_to_square / anyres_rules, see
llava_configs.py): image_aspect_ratio "pad" is expand2square with the
image_mean color, then the CLIP processor (the same pixels as "pad"
above); "anyres" is process_anyres_image, planned by a
LlavaNextImageConfig (the `anyres` field). Its base tile is
image.resize((shortest_edge, shortest_edge)), a squash with Pillow's
default bicubic filter, then the CLIP processor (an identity on that
square): the same pixels as transformers' LlavaNext base tile (a squash
to (size, size) with the configured filter, bicubic for llava-v1.6).
The grid tiles are the same resize, centered zero padding and division as
transformers' too. The repository differs elsewhere, which the `anyres`
config reproduces: it reads image_grid_pinpoints as (width, height), so
ties in select_best_resolution go the other way (a square image of at most
336 pixels gets a 2 x 1 grid, not transformers' 1 x 2), and its
unpad_image truncates (int(x)) where transformers rounds to 7 digits first.
Sizes are (height, width).
"""

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple, Union

from pyvlm.multimodal.image_sizes import center_crop_top_left, shortest_edge_size
from pyvlm.multimodal.llava_configs import llava_kwargs, llava_repo_kwargs
from pyvlm.multimodal.llava_next import LlavaNextImageConfig
from pyvlm.multimodal.processor import ImageProcessorBase
from pyvlm.multimodal.tile_plans import (OPENAI_CLIP_MEAN, ImagePlan, Normalization, Size, Tile,
                                         check_resample, mean_fill, square_canvas)

ASPECT_RATIOS = ("square", "pad", "anyres")
STRATEGIES = ("default", "full")


@dataclass(frozen=True)
class LlavaImageConfig(ImageProcessorBase):
    """The preprocessor and model settings that shape LLaVA-1.5 images.

    tile_size: the tile side (crop_size, = the vision tower's image_size);
    resize: an int resizes the shortest edge to it, a (height, width)
    resizes to exactly that; center_crop: crop the resized image to the
    tile (else it must already be the tile); image_aspect_ratio: "square"
    (the image as it is), "pad" (pasted on a square of square_fill first)
    or "anyres" (the LLaVA repository's process_anyres_image, planned by
    `anyres`); num_cls_tokens: transformers' num_additional_image_tokens.
    Plain data: build it with `from_hf_configs` or `from_llava_repo`.
    """

    FAMILY = "LLaVA"

    tile_size: int = 336
    resize: Union[int, Size] = 336
    center_crop: bool = True
    patch_size: int = 14
    normalization: Normalization = Normalization()
    image_aspect_ratio: str = "square"
    square_fill: Tuple[int, int, int] = mean_fill(OPENAI_CLIP_MEAN)
    vision_feature_select_strategy: str = "default"
    num_cls_tokens: int = 1
    anyres: Optional[LlavaNextImageConfig] = None

    def __post_init__(self):
        check_resample(self.normalization.resample)
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio {self.image_aspect_ratio!r} is not one of "
                             f"{ASPECT_RATIOS}")
        if (self.anyres is not None) != (self.image_aspect_ratio == "anyres"):
            raise ValueError("an anyres config goes with image_aspect_ratio 'anyres', and only")
        if self.vision_feature_select_strategy not in STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy "
                             f"{self.vision_feature_select_strategy!r} is not one of {STRATEGIES}")
        if not self.center_crop and self.resize != (self.tile_size, self.tile_size):
            raise ValueError(f"without a center crop the resize {self.resize} must be the tile "
                             f"({self.tile_size}, {self.tile_size})")

    @property
    def features_per_side(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def variant(self) -> str:
        """The processing path; part of every image's cache key."""
        return self.image_aspect_ratio

    def num_image_tokens(self, image_size: Size) -> int:
        """Placeholder tokens transformers' processor inserts for this image."""
        if self.anyres is not None:
            return self.anyres.num_image_tokens(image_size)
        drop = self.vision_feature_select_strategy == "default"
        return self.features_per_side ** 2 + self.num_cls_tokens - drop

    def plan(self, image_size: Size) -> ImagePlan:
        """The tile(s) of one image (every image of a prompt alike)."""
        if min(image_size) <= 0:
            raise ValueError(f"image size {image_size} has no pixels")
        if self.anyres is not None:
            return self.anyres.plan(image_size)
        canvas = square_canvas(image_size, self.square_fill) if self.variant == "pad" else None
        source = (canvas.side, canvas.side) if canvas is not None else tuple(image_size)
        return ImagePlan(tuple(image_size), self.tile_size, (self.tile_of(source),),
                         self.normalization, self.num_image_tokens(image_size), self.variant,
                         canvas=canvas)

    def tile_of(self, source_size: Size) -> Tile:
        """The processor's resize then center crop of a source (image or canvas)."""
        if isinstance(self.resize, int):
            resized = shortest_edge_size(*source_size, self.resize)
        else:
            resized = tuple(self.resize)
        if not self.center_crop:
            return Tile(resized, (0, 0))
        return Tile(resized, center_crop_top_left(*resized, self.tile_size, self.tile_size))

    @classmethod
    def from_hf_configs(cls, preprocessor_config: Mapping,
                        model_config: Mapping) -> "LlavaImageConfig":
        """From transformers' preprocessor_config.json and config.json
        contents (dicts): a CLIPImageProcessor, LlavaImageProcessor or
        SiglipImageProcessor preprocessor."""
        return cls(**llava_kwargs(preprocessor_config, model_config))

    @classmethod
    def from_llava_repo(cls, llava_config: Mapping, clip_preprocessor: Mapping, *,
                        vision_image_size: int = 336,
                        vision_patch_size: int = 14) -> "LlavaImageConfig":
        """For a checkpoint in the LLaVA repository's layout: its config.json
        (image_aspect_ratio, image_grid_pinpoints as (width, height) pairs,
        mm_vision_select_feature, mm_patch_merge_type) and its vision
        tower's CLIP preprocessor_config.json (e.g. openai/clip-vit-large-
        patch14-336's); the tower's image and patch size."""
        return cls(**llava_repo_kwargs(llava_config, clip_preprocessor, vision_image_size,
                                       vision_patch_size))
