"""The Qwen2-VL vision tower (transformers' Qwen2VisionTransformerPretrainedModel).

A ViT over native-resolution patch grids: LayerNorm blocks with a fc1/fc2
MLP (QuickGELU in the released models), full attention within each frame,
a 2-D rotary on q/k, and a merger folding 2 x 2 patches into one language
token. All images of a step run in one call, packed along the patch rows;
on CUDA a call whose grids were seen before replays a CUDA graph
(pyvlm/layers/shape_graphs.py). Built under several ranks, the blocks split
by heads and MLP columns (qwen_layers.py); the rest stays whole.
"""

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from pyvlm.layers.linear import ColumnParallelLinear, RowParallelLinear
from pyvlm.layers.norm import LayerNorm
from pyvlm.layers.shape_graphs import ShapeGraphs

from .qwen_grid import (AttentionSpans, GridTHW, check_grids, frame_lengths, num_patches,
                        rotary_positions)
from .qwen_layers import (PatchMerger, VisionAttention, VisionBlock, VisionPatchEmbed,
                          VisionRotary, VisionRotaryEmbedding, check_pixel_rows, rope_theta_of,
                          run_blocks, vision_activation)


class Qwen2VisionMLP(nn.Module):
    """fc2(act(fc1(x))); fc1 column-parallel, fc2 row-parallel."""

    def __init__(self, dim: int, hidden_dim: int, hidden_act: str):
        super().__init__()
        self.fc1 = ColumnParallelLinear(dim, hidden_dim)
        self.fc2 = RowParallelLinear(hidden_dim, dim)
        self.act = vision_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def qwen2_vision_block(config) -> VisionBlock:
    dim = config.embed_dim
    return VisionBlock(LayerNorm(dim, eps=1e-6), LayerNorm(dim, eps=1e-6),
                       VisionAttention(dim, config.num_heads),
                       Qwen2VisionMLP(dim, int(dim * config.mlp_ratio), config.hidden_act))


class Qwen2VisionTransformer(nn.Module):
    """Qwen2-VL's `visual` module, built from a Qwen2VLVisionConfig.

    Parameter names are those under "model.visual." (transformers 5) or
    "visual." (the hub checkpoints) with the prefix stripped.
    """

    def __init__(self, config):
        super().__init__()
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_embed = VisionPatchEmbed(config.patch_size, config.temporal_patch_size,
                                            config.in_channels, config.embed_dim)
        self.rotary_pos_emb = VisionRotaryEmbedding(config.embed_dim // config.num_heads,
                                                    rope_theta_of(config))
        self.blocks = nn.ModuleList(qwen2_vision_block(config) for _ in range(config.depth))
        self.merger = PatchMerger(config.embed_dim, config.hidden_size, config.spatial_merge_size,
                                  LayerNorm(config.embed_dim, eps=1e-6))
        self.shape_graphs = ShapeGraphs()  # off until the runner enables it (CUDA graphs)

    def forward(self, pixel_values: torch.Tensor,
                grid_thw: Sequence[Sequence[int]]) -> torch.Tensor:
        """pixel_values [num_patches, 3 * temporal * patch * patch] of every
        image, concatenated in grid order; grid_thw: each image's (t, h, w)
        patch grid as Python ints. Returns the merged token rows
        [sum(t * h * w) / merge^2, hidden_size], image after image."""
        grids = check_grids(grid_thw, self.spatial_merge_size)
        check_pixel_rows(pixel_values, num_patches(grids))
        device = pixel_values.device
        return self.shape_graphs.run(tuple(grids), pixel_values,
                                     lambda: self._metadata(grids, device), self._encode)

    def _metadata(self, grids: Sequence[GridTHW], device: torch.device) -> "TowerMetadata":
        rotary = self.rotary_pos_emb.for_positions(
            rotary_positions(grids, self.spatial_merge_size), device)
        return TowerMetadata(rotary, AttentionSpans.of(frame_lengths(grids), device))

    def _encode(self, pixel_values: torch.Tensor, meta: "TowerMetadata") -> torch.Tensor:
        hidden, residual = run_blocks(self.blocks, self.patch_embed(pixel_values),
                                      lambda index: (meta.rotary, meta.spans))
        return self.merger(hidden, residual)


@dataclass(frozen=True)
class TowerMetadata:
    """What the blocks read besides the pixels, built from the grids alone."""

    rotary: VisionRotary
    spans: AttentionSpans
