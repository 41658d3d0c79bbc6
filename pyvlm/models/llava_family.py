"""What LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision share: a CLIP or SigLIP
tower read at vision_feature_layer, the 2-layer projector, image tiles
turned into token rows in one tower call, and the anyres packing (base
tile, then the tile grid unpadded to the image's aspect ratio with an
image_newline after every row), as transformers 5.25's modeling_llava*.py.

A family subclasses LlavaFamilyModel and says how many tiles of an image the
model reads (num_tiles_used) and how their features become rows
(pack_image_features); the engine's image stages (prepare_images,
encode_prepared) are shared.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from pyvlm.multimodal.llava_onevision import (anyres_grid_shape, downsampled_feature_grid,
                                              num_anyres_tiles, unpadding_crop)
from pyvlm.layers.tensor_parallel import building_tower, replicated
from .llava_images import Geometry, encode_prepared, prepare_images
from .vision_language import VisionLanguageModel

ACTIVATIONS = {"gelu": nn.GELU, "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
               "relu": nn.ReLU, "silu": nn.SiLU}

# checkpoint prefix -> model prefix: the LLaVA authors' layout's tower and
# projector (pyvlm.conversions.llava_original), transformers 5 names, the
# hub's older (transformers 4) names, a separate tower folder's names, and
# last the authors' decoder names (model.layers.*).
LLAVA_PREFIXES = (
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.language_model.", "language_model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("vision_model.", "vision_tower."),
    ("model.", "language_model."),
)


def vision_tower_for(vision_config, feature_layer) -> nn.Module:
    """The tower of a vision config's model_type (SigLIP or CLIP)."""
    model_type = vision_config.model_type
    if model_type == "siglip_vision_model":
        from .vision.siglip import SiglipVisionTower

        return SiglipVisionTower(vision_config, feature_layer)
    if model_type == "clip_vision_model":
        from .vision.clip import CLIPVisionTower

        return CLIPVisionTower(vision_config, feature_layer)
    raise NotImplementedError(f"vision tower {model_type!r} "
                              "(supported: siglip_vision_model, clip_vision_model)")


class LlavaMultiModalProjector(nn.Module):
    """linear_1, activation, linear_2 (transformers' LlavaMultiModalProjector)."""

    def __init__(self, config, num_feature_layers: int):
        super().__init__()
        text_hidden = config.text_config.hidden_size
        bias = getattr(config, "multimodal_projector_bias", True)
        self.linear_1 = nn.Linear(config.vision_config.hidden_size * num_feature_layers,
                                  text_hidden, bias=bias)
        if config.projector_hidden_act not in ACTIVATIONS:
            raise NotImplementedError(f"projector activation {config.projector_hidden_act!r}")
        self.act = ACTIVATIONS[config.projector_hidden_act]()
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class LlavaFamilyModel(VisionLanguageModel):
    """Tower + projector over a Llama / Qwen2 / Mistral decoder; subclasses
    decide tiles and packing (module docstring).

    Tensor parallel: the decoder splits over the group it is built in; the
    tower is built in `building_tower()`: replicated (every rank holds and
    runs it whole, so each has the image rows its embeddings need without a
    collective), or split by heads and MLP columns like the decoder when the
    engine shards towers (--mm-encoder-tp-mode weights; its output is whole
    on every rank after each layer's all-reduce). The projector and
    image_newline are always replicated."""

    NAME_PREFIXES = LLAVA_PREFIXES
    HAS_IMAGE_NEWLINE = True

    def __init__(self, config):
        super().__init__(config, config.text_config)
        with building_tower():
            self.vision_tower = vision_tower_for(config.vision_config,
                                                 config.vision_feature_layer)
        with replicated():
            self.multi_modal_projector = LlavaMultiModalProjector(
                config, len(self.vision_tower.feature_layers))
        if self.HAS_IMAGE_NEWLINE:
            self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        self.image_token_id = config.image_token_id

    def vision_name_of(self, name: str) -> Optional[str]:
        if name.startswith("vision_tower.") and self.vision_tower.is_unused_weight(
                name[len("vision_tower."):]):
            return None
        return name

    @property
    def image_dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    # --- images: the engine's contract --------------------------------------

    def prepare_images(self, images, plans, device="cpu") -> list:
        """Tower inputs of one prompt's images, on device (the CPU when the
        request is built; the model's device in the step on a GPU)."""
        return prepare_images(images, plans, self.image_dtype, device)

    def encode_prepared(self, items) -> List[torch.Tensor]:
        """Token rows of multimodal items carrying prepare_images' payloads (in the step)."""
        return encode_prepared(self, items)

    # --- images ------------------------------------------------------------

    def embed_images(self, pixel_values: List[torch.Tensor], image_sizes: Sequence[Sequence[int]],
                     batch_num_images: Sequence[int],
                     geometry: Optional[Sequence[Geometry]] = None) -> List[torch.Tensor]:
        """Per image, the rows replacing its placeholders [num_tokens_i, hidden].

        pixel_values[i]: image i's tiles [num_tiles_i, 3, S, S] from the image
        processor; image_sizes[i]: its original (height, width);
        batch_num_images[i]: the number of images in image i's prompt;
        geometry[i]: how its plan laid the tiles out (None: transformers'
        rules from the config, for a transformers processor's padded tiles).
        One tower call for every tile of every image.
        """
        if not len(pixel_values) == len(image_sizes) == len(batch_num_images):
            raise ValueError("pixel_values, image_sizes and batch_num_images need one entry "
                             "per image")
        if not pixel_values:
            return []
        geometry = list(geometry) if geometry is not None else [None] * len(pixel_values)
        num_tiles = [self.num_tiles_used(tuple(size), num == 1) if geom is None else geom.num_tiles
                     for size, num, geom in zip(image_sizes, batch_num_images, geometry)]
        tiles = torch.cat([_tiles(pix, n) for pix, n in zip(pixel_values, num_tiles)])
        features = self.multi_modal_projector(self.selected_features(tiles))
        return [self.pack_image_features(per_image, tuple(size), geom)
                for per_image, size, geom in zip(features.split(num_tiles), image_sizes, geometry)]

    def selected_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """Tower features per tile; the "default" strategy drops the first
        (CLS position) token, as transformers does even for SigLIP."""
        features = self.vision_tower(tiles)
        if self.config.vision_feature_select_strategy == "default":
            return features[:, 1:]
        return features

    def num_tiles_used(self, image_size: Tuple[int, int], is_single_image: bool) -> int:
        """Tiles of the image the model reads."""
        raise NotImplementedError

    def pack_image_features(self, features: torch.Tensor, image_size: Tuple[int, int],
                            geometry: Optional[Geometry] = None) -> torch.Tensor:
        """[num_tiles, features_per_tile, hidden] -> the image's token rows."""
        raise NotImplementedError

    # --- anyres (LLaVA-NeXT, LLaVA-OneVision) --------------------------------

    def num_anyres_tiles(self, image_size: Tuple[int, int]) -> int:
        """The base tile plus the best pinpoint's tile grid."""
        return num_anyres_tiles(image_size, self.config.image_grid_pinpoints,
                                self.config.vision_config.image_size)

    def pack_anyres_features(self, features: torch.Tensor, image_size: Tuple[int, int],
                             max_num_patches: Optional[int] = None,
                             geometry: Optional[Geometry] = None) -> torch.Tensor:
        """Base features, then the grid's unpadded feature map (shrunk to
        about max_num_patches tiles of area when given) with an image_newline
        after every row; a lone tile gets one newline."""
        newline = self.image_newline.to(features.dtype)
        if features.shape[0] == 1:
            return torch.cat((features[0], newline[None]), dim=0)
        grid = self.anyres_feature_map(features[1:], image_size, max_num_patches, geometry)
        channels, height, _ = grid.shape
        grid = torch.cat((grid, newline[:, None, None].expand(channels, height, 1)), dim=-1)
        return torch.cat((features[0], grid.flatten(1, 2).transpose(0, 1)), dim=0)

    def anyres_feature_map(self, grid_features: torch.Tensor, image_size: Tuple[int, int],
                           max_num_patches: Optional[int] = None,
                           geometry: Optional[Geometry] = None) -> torch.Tensor:
        """The grid tiles' features as one unpadded [hidden, h, w] map, laid
        out by the plan's geometry, or by transformers' rules from the config."""
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        if grid_features.shape[1] != side * side:
            raise ValueError("The number of patches is not consistent with the image size.")
        if geometry is not None and geometry.grid_shape is not None:
            rows, cols = geometry.grid_shape
        else:
            rows, cols = anyres_grid_shape(image_size, self.config.image_grid_pinpoints,
                                           vision.image_size)
        fmap = grid_features.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3)
        fmap = fmap.reshape(fmap.shape[0], rows * side, cols * side)
        if geometry is not None and geometry.feature_crop is not None:
            top, bottom, left, right = geometry.feature_crop
        else:
            top, bottom, left, right = unpadding_crop(image_size, tuple(fmap.shape[1:]))
        fmap = fmap[:, top:bottom, left:right]
        if max_num_patches is None:
            return fmap
        new_size = downsampled_feature_grid(fmap.shape[1], fmap.shape[2], side, max_num_patches)
        if new_size != tuple(fmap.shape[1:]):
            fmap = F.interpolate(fmap[None], list(new_size), mode="bilinear")[0]
        return fmap


def _tiles(pixel_values: torch.Tensor, num_tiles: int) -> torch.Tensor:
    if pixel_values.shape[0] < num_tiles:
        raise ValueError(f"an image has {pixel_values.shape[0]} tiles, the model needs "
                         f"{num_tiles}")
    return pixel_values[:num_tiles]
