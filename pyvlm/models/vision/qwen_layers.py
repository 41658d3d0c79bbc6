"""Layers shared by the Qwen2-VL and Qwen2.5-VL vision towers.

Module and parameter names are transformers' (patch_embed.proj, attn.qkv,
attn.proj, merger.ln_q, merger.mlp.0/2), so checkpoint tensors load one to
one. The two families differ only in the norms and MLP of their blocks and
in the attention segments each block uses; everything else lives here.

Tensor parallel: built under a group of several ranks (a tower built in
`building_tower()` with shard_towers), a block's attention splits by heads
(the fused qkv column-parallel, proj row-parallel) and its MLP by columns
then rows, as the decoder's; the patch embedding, the rotary, the norms and
the merger stay whole on every rank.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from pyvlm import ops
from pyvlm.layers.linear import FusedQKVParallelLinear, RowParallelLinear
from pyvlm.layers.norm import norm_with_residual
from pyvlm.layers.packed_attention import packed_attention

from .qwen_grid import AttentionSpans


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # transformers' QuickGELUActivation, x * sigmoid(1.702 x), in one kernel
    # with its rounding (three elementwise kernels in eager torch).
    return ops.quick_gelu(x.contiguous())


_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def vision_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation a vision config's hidden_act names (as transformers' ACT2FN)."""
    if name not in _ACTIVATIONS:
        raise NotImplementedError(f"vision activation {name!r} (supported: "
                                  f"{', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


class VisionPatchEmbed(nn.Module):
    """Each row of pixel values (one patch: channels x temporal x P x P) to an
    embedding. The weight keeps transformers' Conv3d shape, but the conv is a
    matmul: kernel == stride, so the conv is exactly a linear map of each row,
    and one GEMM is far faster than a 3-D convolution on GPU."""

    def __init__(self, patch_size: int, temporal_patch_size: int, in_channels: int,
                 embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel,
                              bias=False)
        self.patch_dim = in_channels * temporal_patch_size * patch_size * patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_patches, patch_dim] (any float dtype) -> [num_patches, embed_dim]."""
        if pixel_values.dim() != 2 or pixel_values.shape[1] != self.patch_dim:
            raise ValueError(f"pixel_values must be [num_patches, {self.patch_dim}], got "
                             f"{tuple(pixel_values.shape)}")
        weight = self.proj.weight.view(self.embed_dim, self.patch_dim)
        return F.linear(pixel_values.to(weight.dtype), weight)


@dataclass(frozen=True)
class VisionRotary:
    """One tower call's 2-D rotary inputs: per-patch positions int64 [3,
    num_patches] (rows: patch row, patch column, unused) and the float32
    cos/sin table [max_position, head_dim] (vLLM layout: cos half, sin half)."""

    positions: torch.Tensor
    cos_sin: torch.Tensor

    def rotate_(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Rotates [num_patches, heads, head_dim] views in place.

        Transformers' vision rotary gives frequency j < head_dim/4 the patch
        row's angle and the next head_dim/4 frequencies the column's, over
        the whole head in rotate_half layout; that is mrope with two sections
        (row 0, row 1), so the mrope kernel applies it (in float32, rounding
        once, as apply_rotary_pos_emb_vision)."""
        head_dim = self.cos_sin.shape[1]
        ops.mrope(self.positions, query, key, head_dim, self.cos_sin,
                  [head_dim // 4, head_dim // 4])


class VisionRotaryEmbedding(nn.Module):
    """Builds VisionRotary inputs; holds no weights.

    The table comes from a float32 CPU inverse-frequency vector kept outside
    the module's buffers, so model.to(bfloat16) cannot round it (transformers
    computes cos/sin in float32 whatever the model dtype). The table on the
    last device used is cached, rows for the largest grid side seen so far."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"vision head_dim {head_dim} must be a multiple of 4")
        spatial_dim = head_dim // 2
        exponents = torch.arange(0, spatial_dim, 2, dtype=torch.float, device="cpu") / spatial_dim
        self._inv_freq = 1.0 / (theta ** exponents)
        self._table: Optional[torch.Tensor] = None

    def cos_sin_table(self, max_position: int, device: torch.device) -> torch.Tensor:
        """float32 [>= max_position, head_dim] on device."""
        table = self._table
        if table is None or table.device != device or table.shape[0] < max_position:
            size = 1 << (max_position - 1).bit_length()  # a power of two: few rebuilds
            positions = torch.arange(size, dtype=torch.float, device=device)
            freqs = positions[:, None] * self._inv_freq.to(device)[None, :]
            cos, sin = freqs.cos(), freqs.sin()
            self._table = table = torch.cat([cos, cos, sin, sin], dim=1)
        return table

    def for_positions(self, row_col: torch.Tensor, device: torch.device) -> VisionRotary:
        """row_col: int64 [num_patches, 2] on the CPU, in the tower's patch order."""
        # The mrope op takes three rows; the third feeds no section (zeros).
        positions = torch.cat([row_col.t(), torch.zeros_like(row_col[:, :1]).t()])
        max_position = int(row_col.max()) + 1
        return VisionRotary(positions.to(device, non_blocking=True),
                            self.cos_sin_table(max_position, device))


class VisionAttention(nn.Module):
    """Non-causal multi-head attention within segments (images, frames or
    windows) of the packed patches, with the 2-D rotary on q and k.

    The checkpoint's qkv is one [3 * dim, dim] tensor; under several ranks
    each holds its heads' rows of q, k and v (FusedQKVParallelLinear) and
    proj sums the ranks' heads (row-parallel). num_heads is the rank's."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"vision width {dim} is not a multiple of {num_heads} heads")
        self.head_dim = dim // num_heads
        self.qkv = FusedQKVParallelLinear(dim, self.head_dim, num_heads, bias=True)
        self.proj = RowParallelLinear(dim, dim)
        self.num_heads = self.qkv.num_heads

    def forward(self, hidden: torch.Tensor, rotary: VisionRotary,
                spans: AttentionSpans) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv(hidden).view(num_tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.unbind(1)  # strided views; the ops take them as they are
        rotary.rotate_(query, key)
        out = packed_attention(query, key, value, spans.cu_seqlens, spans.cu_seqlens,
                               spans.max_seqlen, spans.max_seqlen, self.head_dim ** -0.5,
                               equal_lengths=spans.equal_lengths)
        return self.proj(out.view(num_tokens, -1))


class VisionBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then + mlp(norm2(x)).

    The residual stream is carried between blocks unsummed, as vLLM's
    decoder layers: a block takes the previous block's MLP output and the
    residual (None in the first block, whose input is the patch embeddings)
    and returns its own MLP output and residual, whose sum is the block's
    output. norm1 fuses the previous block's MLP add and norm2 the attention
    add (fused_add_layer_norm / fused_add_rms_norm: one kernel instead of an
    add and a norm, 32 times a block stack). The norms take the residual in
    place, so the first block's input must be a tensor nothing else reads."""

    def __init__(self, norm1: nn.Module, norm2: nn.Module, attn: VisionAttention,
                 mlp: nn.Module):
        super().__init__()
        self.norm1, self.norm2, self.attn, self.mlp = norm1, norm2, attn, mlp

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                rotary: VisionRotary, spans: AttentionSpans
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = norm_with_residual(self.norm1, hidden, residual)
        hidden, residual = self.norm2(self.attn(hidden, rotary, spans), residual)
        return self.mlp(hidden), residual


class PatchMerger(nn.Module):
    """Norms each patch, folds each merge x merge block (consecutive rows in
    the tower's patch order) into one row and projects it to the language
    model's width: mlp = Linear, GELU, Linear (merger.mlp.0 / merger.mlp.2)."""

    def __init__(self, context_dim: int, out_dim: int, merge_size: int, ln_q: nn.Module):
        super().__init__()
        self.merged_dim = context_dim * merge_size ** 2
        self.ln_q = ln_q
        self.mlp = nn.Sequential(nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(),
                                 nn.Linear(self.merged_dim, out_dim))

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """hidden: the last hidden state, or with residual the last block's
        MLP output (VisionBlock), whose add ln_q then fuses."""
        normed = self.ln_q(hidden) if residual is None else self.ln_q(hidden, residual)[0]
        return self.mlp(normed.view(-1, self.merged_dim))


def run_blocks(blocks: Iterable[VisionBlock], hidden: torch.Tensor,
               block_args: Callable[[int], tuple]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Runs the blocks over the patch embeddings `hidden` (taken in place);
    block_args(i) gives block i's (rotary, spans). Returns the last MLP
    output and the residual (None without blocks) for PatchMerger."""
    residual = None
    for index, block in enumerate(blocks):
        hidden, residual = block(hidden, residual, *block_args(index))
    return hidden, residual


def rope_theta_of(vision_config) -> float:
    """The vision rotary base (transformers 5's rope_parameters; 10000 in
    configs that predate it, as transformers defaults it)."""
    params = getattr(vision_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))


def check_pixel_rows(pixel_values: torch.Tensor, expected: int) -> None:
    if pixel_values.shape[0] != expected:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} patch rows, the grids "
                         f"hold {expected}")

