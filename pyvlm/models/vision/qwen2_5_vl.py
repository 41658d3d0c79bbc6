"""The Qwen2.5-VL vision tower (transformers' Qwen2_5_VisionTransformerPretrainedModel).

Qwen2-VL's tower with RMSNorm, a SwiGLU MLP (gate/up/down, with biases) and
window attention: most blocks attend within windows of window_size pixels
(window_size / merge / patch merged units a side), the blocks listed in
fullatt_block_indexes within whole frames. To make every window a run of
consecutive rows, the patches are reordered window by window (whole merge
units, so the merger still sees each 2 x 2 block together) before the first
block, and the merged tokens are put back in image order after the merger,
exactly as transformers does. Built under several ranks, the blocks split
by heads and MLP columns (qwen_layers.py); the rest stays whole.
"""

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from pyvlm.layers.linear import ColumnParallelLinear, RowParallelLinear
from pyvlm.layers.norm import RMSNorm
from pyvlm.layers.shape_graphs import ShapeGraphs

from .qwen_grid import (AttentionSpans, GridTHW, check_grids, expand_units, frame_lengths,
                        num_patches, rotary_positions, window_order)
from .qwen_layers import (PatchMerger, VisionAttention, VisionBlock, VisionPatchEmbed,
                          VisionRotary, VisionRotaryEmbedding, check_pixel_rows, rope_theta_of,
                          run_blocks, vision_activation)


class Qwen2_5_VisionMLP(nn.Module):
    """down(act(gate(x)) * up(x)), every projection with a bias; gate and up
    column-parallel (two layers, as the checkpoint's two tensors and
    nn.Linear's initialisation order), down row-parallel."""

    def __init__(self, dim: int, hidden_dim: int, hidden_act: str):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(dim, hidden_dim)
        self.up_proj = ColumnParallelLinear(dim, hidden_dim)
        self.down_proj = RowParallelLinear(hidden_dim, dim)
        self.act = vision_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def qwen2_5_vision_block(config) -> VisionBlock:
    dim = config.hidden_size
    return VisionBlock(RMSNorm(dim, eps=1e-6), RMSNorm(dim, eps=1e-6),
                       VisionAttention(dim, config.num_heads),
                       Qwen2_5_VisionMLP(dim, config.intermediate_size, config.hidden_act))


def window_units_of(config) -> int:
    """Merged units per window side."""
    units = config.window_size // config.spatial_merge_size // config.patch_size
    if units < 1:
        raise ValueError(f"window_size {config.window_size} is smaller than one merged unit "
                         f"({config.spatial_merge_size} x {config.patch_size} pixels)")
    return units


class Qwen2_5_VisionTransformer(nn.Module):
    """Qwen2.5-VL's `visual` module, built from a Qwen2_5_VLVisionConfig.

    Parameter names are those under "model.visual." (transformers 5) or
    "visual." (the hub checkpoints) with the prefix stripped.
    """

    def __init__(self, config):
        super().__init__()
        self.spatial_merge_size = config.spatial_merge_size
        self.window_units = window_units_of(config)
        self.fullatt_block_indexes = frozenset(config.fullatt_block_indexes)
        self.patch_embed = VisionPatchEmbed(config.patch_size, config.temporal_patch_size,
                                            config.in_channels, config.hidden_size)
        self.rotary_pos_emb = VisionRotaryEmbedding(config.hidden_size // config.num_heads,
                                                    rope_theta_of(config))
        self.blocks = nn.ModuleList(qwen2_5_vision_block(config) for _ in range(config.depth))
        self.merger = PatchMerger(config.hidden_size, config.out_hidden_size,
                                  config.spatial_merge_size, RMSNorm(config.hidden_size, eps=1e-6))
        self.shape_graphs = ShapeGraphs()  # off until the runner enables it (CUDA graphs)

    def forward(self, pixel_values: torch.Tensor,
                grid_thw: Sequence[Sequence[int]]) -> torch.Tensor:
        """pixel_values [num_patches, 3 * temporal * patch * patch] of every
        image, concatenated in grid order; grid_thw: each image's (t, h, w)
        patch grid as Python ints. Returns the merged token rows
        [sum(t * h * w) / merge^2, out_hidden_size], image after image."""
        grids = check_grids(grid_thw, self.spatial_merge_size)
        check_pixel_rows(pixel_values, num_patches(grids))
        device = pixel_values.device
        return self.shape_graphs.run(tuple(grids), pixel_values,
                                     lambda: self._metadata(grids, device), self._encode)

    def _metadata(self, grids: Sequence[GridTHW], device: torch.device) -> "WindowedMetadata":
        merge = self.spatial_merge_size
        window_index, window_sizes = window_order(grids, merge, self.window_units)
        patch_order = expand_units(window_index, merge * merge)
        rotary = self.rotary_pos_emb.for_positions(
            rotary_positions(grids, merge)[patch_order], device)
        # Both segmentations hold in the window order: windows never cross
        # frames, so each frame's patches stay one consecutive run.
        return WindowedMetadata(
            rotary=rotary,
            frames=AttentionSpans.of(frame_lengths(grids), device),
            windows=AttentionSpans.of([size * merge * merge for size in window_sizes], device),
            patch_order=patch_order.to(device, non_blocking=True),
            image_order=torch.argsort(window_index).to(device, non_blocking=True))

    def _encode(self, pixel_values: torch.Tensor, meta: "WindowedMetadata") -> torch.Tensor:
        hidden, residual = run_blocks(self.blocks, self.patch_embed(pixel_values)[meta.patch_order],
                                      lambda index: (meta.rotary, self._spans(meta, index)))
        return self.merger(hidden, residual)[meta.image_order]

    def _spans(self, meta: "WindowedMetadata", index: int) -> AttentionSpans:
        """Block index attends within whole frames or within windows."""
        return meta.frames if index in self.fullatt_block_indexes else meta.windows


@dataclass(frozen=True)
class WindowedMetadata:
    """What the blocks read besides the pixels, built from the grids alone:
    the rotary, the frame and window segments, the window order of the
    patches and the image order of the merged rows."""

    rotary: VisionRotary
    frames: AttentionSpans
    windows: AttentionSpans
    patch_order: torch.Tensor
    image_order: torch.Tensor
