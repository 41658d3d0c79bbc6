"""Per-call metadata of the Qwen2-VL family's vision towers, from plain grids.

A tower call takes the (t, h, w) patch grid of every image (or video) of a
step as Python ints, so everything the blocks need is built here on the host
from those ints, before any kernel runs, and uploaded once per call: no block
ever reads a device tensor back. The tensors made here are CPU tensors on
purpose (a default-device context must not move them to the GPU, where
.tolist() would sync). The layouts follow transformers'
vision_utils (get_vision_position_ids, get_vision_cu_seqlens,
get_vision_window_index), which the parity tests check.
"""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch.nn import functional as F

GridTHW = Tuple[int, int, int]


def check_grids(grid_thw: Sequence[Sequence[int]], merge_size: int) -> List[GridTHW]:
    """The grids as int triples; raises unless each h and w is a positive
    multiple of the merge size (the merger folds merge x merge patches)."""
    grids = []
    for grid in grid_thw:
        t, h, w = (int(v) for v in grid)
        if t < 1 or h < 1 or w < 1 or h % merge_size or w % merge_size:
            raise ValueError(f"grid (t, h, w) = {(t, h, w)} must be positive with h and w "
                             f"multiples of spatial_merge_size {merge_size}")
        grids.append((t, h, w))
    if not grids:
        raise ValueError("grid_thw is empty")
    return grids


def num_patches(grids: Sequence[GridTHW]) -> int:
    return sum(t * h * w for t, h, w in grids)


def frame_lengths(grids: Sequence[GridTHW]) -> List[int]:
    """Patches per attention segment of a full-attention block: every frame
    of every grid is its own segment (transformers' get_vision_cu_seqlens)."""
    return [h * w for t, h, w in grids for _ in range(t)]


def rotary_positions(grids: Sequence[GridTHW], merge_size: int) -> torch.Tensor:
    """int64 [num_patches, 2]: each patch's (row, column) in its frame, in the
    tower's patch order, which walks merge x merge blocks row-major and the
    patches of a block row-major (the order the image processor emits)."""
    rows = []
    for t, h, w in grids:
        row = torch.arange(h, device="cpu").view(h, 1).expand(h, w)
        col = torch.arange(w, device="cpu").view(1, w).expand(h, w)
        blocks = (h // merge_size, merge_size, w // merge_size, merge_size)
        row, col = (x.reshape(blocks).transpose(1, 2).flatten() for x in (row, col))
        rows.append(torch.stack([row, col], dim=-1).repeat(t, 1))
    return torch.cat(rows)


def window_order(grids: Sequence[GridTHW], merge_size: int,
                 window_units: int) -> Tuple[torch.Tensor, List[int]]:
    """Qwen2.5-VL's window partition of the merged units (merge x merge patch
    blocks): returns (window_index, window_sizes).

    window_index int64 [num_units]: the unit at each position of the window
    order, which walks frames, then windows of window_units x window_units
    units row-major, then the units of a window row-major; windows at the
    right and bottom edges are partial. window_sizes: units per window, in
    that order. Matches transformers' get_vision_window_index, minus its
    empty windows (which it drops too).
    """
    indices, sizes, offset = [], [], 0
    for t, h, w in grids:
        rows, cols = h // merge_size, w // merge_size
        num_rows, num_cols = -(-rows // window_units), -(-cols // window_units)
        units = torch.arange(t * rows * cols, device="cpu").view(t, rows, cols)
        padded = F.pad(units, (0, num_cols * window_units - cols,
                               0, num_rows * window_units - rows), value=-1)
        windows = (padded.view(t, num_rows, window_units, num_cols, window_units)
                   .permute(0, 1, 3, 2, 4).reshape(-1, window_units * window_units))
        valid = windows >= 0
        indices.append(windows[valid] + offset)
        sizes.extend(valid.sum(dim=1).tolist())
        offset += t * rows * cols
    return torch.cat(indices), sizes


def expand_units(unit_index: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Patch indices of a unit order: unit u stands for patches
    [u * unit_size, (u + 1) * unit_size)."""
    offsets = torch.arange(unit_size, device=unit_index.device)
    return (unit_index.view(-1, 1) * unit_size + offsets).flatten()


@dataclass(frozen=True)
class AttentionSpans:
    """Segments of a block-diagonal attention: cu_seqlens (int32 [n + 1], on
    the tower's device) and the longest segment, as ops.varlen_attention
    takes them; equal_lengths: every segment is max_seqlen long (one
    image's frames: a dense batch)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    equal_lengths: bool = False

    @classmethod
    def of(cls, lengths: Sequence[int], device: torch.device) -> "AttentionSpans":
        bounds = [0]
        for length in lengths:
            bounds.append(bounds[-1] + length)
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device="cpu")
        return cls(cu_seqlens.to(device, non_blocking=True), max(lengths),
                   min(lengths) == max(lengths))
