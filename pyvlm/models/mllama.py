"""Llama-3.2-Vision (mllama): a tiled vision encoder whose projected
states the Llama decoder reads through gated cross-attention layers
(transformers 5.25's modeling_mllama.py).

Images are not tokens of the sequence: each <|image|> stays one token
(embedded like any other, in the 8 embedding rows past the vocabulary),
and the image's rows enter through the cross-attention layers at the text
config's cross_attention_layers. The engine keeps each image's K/V in the
KV pool (pyvlm.runner.kv_pool), computed once per image; the step's
CrossAttentionInputs say which rows each token sees
(pyvlm.models.mllama_cross_inputs).
"""

from dataclasses import dataclass
from typing import List, Sequence

import torch
from torch import nn

from pyvlm.layers.tensor_parallel import building_tower, replicated
from pyvlm.ops.host_upload import to_device_async
from pyvlm.scheduling.types import MultimodalItem, SequenceChunk
from .llama import LlamaDecoderLayer
from .mllama_cross_attention import MllamaCrossAttentionDecoderLayer
from .mllama_cross_inputs import (CrossAttentionInputs, EncodeFn, GraphCrossInputs,
                                  build_cross_attention_inputs)
from .mllama_pixels import mllama_pixel_values
from .vision.mllama import MllamaVisionModel
from .vision_language import VisionLanguageModel

# checkpoint prefix -> model prefix: transformers 5 names, then the
# meta-llama hub repositories' (transformers 4.45) names.
MLLAMA_PREFIXES = (
    ("model.language_model.", "language_model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
)
NUM_EXTRA_EMBEDDINGS = 8  # transformers' MllamaTextModel embeds vocab_size + 8 tokens


@dataclass(frozen=True)
class PreparedTiles:
    """One image ready for the tower: its real tiles [tiles, 3, side, side]
    (CPU) and transformers' aspect_ratio_id of its canvas."""

    pixel_values: torch.Tensor
    aspect_ratio_id: int

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]

    @property
    def num_bytes(self) -> int:
        return self.pixel_values.numel() * self.pixel_values.element_size()


def layer_factory_for(text_config):
    """Cross-attention layers at text_config.cross_attention_layers,
    self-attention layers elsewhere."""
    cross = set(text_config.cross_attention_layers)

    def make_layer(index, shape, rotary) -> nn.Module:
        if index in cross:
            return MllamaCrossAttentionDecoderLayer.from_config(text_config)
        return LlamaDecoderLayer(shape, rotary)

    return make_layer


class MllamaForConditionalGeneration(VisionLanguageModel):
    """The mllama vision encoder and projector over a Llama decoder with
    gated cross-attention layers. Tensor parallel: the decoder (its
    cross-attention layers too) splits over the group it is built in; the
    vision encoder is built in `building_tower()`: replicated, or, when the
    engine shards towers (--mm-encoder-tp-mode weights), split by heads and
    MLP columns (its output rows still whole on every rank); the projector
    is replicated (each rank computes its own image K/V heads from the full
    rows)."""

    NAME_PREFIXES = MLLAMA_PREFIXES

    def __init__(self, config):
        text = config.text_config
        super().__init__(config, text, layer_factory_for(text),
                         num_extra_embeddings=NUM_EXTRA_EMBEDDINGS)
        self.cross_attention_layers = tuple(sorted(text.cross_attention_layers))
        vision = config.vision_config
        with building_tower():
            self.vision_model = MllamaVisionModel(vision)
        with replicated():
            self.multi_modal_projector = nn.Linear(vision.vision_output_dim, text.hidden_size,
                                                   bias=True)
        self.image_token_id = config.image_token_id
        self.max_num_tiles = vision.max_num_tiles
        self.num_patches = self.vision_model.num_patches

    # --- images: the engine's contract --------------------------------------

    def prepare_images(self, images, plans, device="cpu") -> List[PreparedTiles]:
        """Real tiles of one prompt's images, on device (the CPU when the
        request is built; the model's device in the step on a GPU)."""
        tiles = mllama_pixel_values(images, plans, device, self.lm_head.weight.dtype)
        return [PreparedTiles(t, plan.aspect_ratio_id) for t, plan in zip(tiles, plans)]

    def encoder_rows_of(self, item: MultimodalItem) -> int:
        """Rows of an image's tower output: every tile (padding tiles too)."""
        return self.max_num_tiles * self.num_patches

    def encode_prepared(self, items: Sequence[MultimodalItem]) -> List[torch.Tensor]:
        """Per item, its projected tower rows [max_tiles * patches, hidden],
        tile after tile, padding tiles included (one tower call)."""
        prepared = [item.prepared for item in items]
        weight = self.multi_modal_projector.weight
        pixels, ids, mask = self._tower_inputs(prepared, weight.device, weight.dtype)
        states = self.vision_model(pixels, ids, mask,  # [1, images, tiles, patches, dim]
                                   [image.num_tiles for image in prepared])
        rows = self.multi_modal_projector(states.reshape(len(items), -1, states.shape[-1]))
        return list(rows.unbind(0))

    def _tower_inputs(self, prepared: Sequence[PreparedTiles], device, dtype):
        """transformers' batch of one sample: every image padded to
        max_num_tiles with raw zero tiles, aspect ratio ids and tile mask."""
        side = prepared[0].pixel_values.shape[-1]
        pixels = torch.zeros((1, len(prepared), self.max_num_tiles, 3, side, side),
                             dtype=dtype, device=device)
        mask = torch.zeros((1, len(prepared), self.max_num_tiles), dtype=torch.long)
        for index, image in enumerate(prepared):
            pixels[0, index, :image.num_tiles] = image.pixel_values.to(device, dtype,
                                                                       non_blocking=True)
            mask[0, index, :image.num_tiles] = 1
        ids = torch.tensor([[image.aspect_ratio_id for image in prepared]], dtype=torch.long)
        return pixels, to_device_async(ids, device), to_device_async(mask, device)

    def graph_cross_attention_inputs(self, max_bs: int, pool) -> GraphCrossInputs:
        """Static cross-attention inputs for captured decode graphs of up to
        max_bs tokens, each reading one stored image of up to max_num_tiles
        tiles (pyvlm.runner.cuda_graphs)."""
        weight = self.multi_modal_projector.weight
        # Whole pages: a page holds several blocks per cross-attention layer,
        # so an image's blocks are not its rows / page_size (for
        # Llama-3.2-11B-Vision's 4 tiles, 404 blocks where that gives 401).
        max_blocks = pool.num_image_blocks(self.max_num_tiles * self.num_patches)
        return GraphCrossInputs(max_bs, max_blocks, pool, weight.dtype, weight.device)

    def cross_attention_inputs(self, chunks: Sequence[SequenceChunk], pool, encode: EncodeFn,
                               is_decode: bool) -> CrossAttentionInputs:
        """The step's image rows per token and the images to store (runs in
        the engine step; encode is the runner's cached tower)."""
        weight = self.multi_modal_projector.weight
        return build_cross_attention_inputs(chunks, pool, encode, is_decode, weight.device,
                                            weight.dtype, self.encoder_rows_of)
