"""Pure-torch references for the layer ops (HF and torch formulas, no intermediate rounding)."""

import math
from typing import Sequence

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon) * weight


def fused_add_rms_norm(x, residual, weight, epsilon):
    """Returns (normalised, new residual)."""
    residual = x + residual
    return rms_norm(residual, weight, epsilon), residual


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias, epsilon: float) -> torch.Tensor:
    """nn.LayerNorm's formula: biased variance, eps inside the root."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + epsilon) * weight
    return out if bias is None else out + bias


def fused_add_layer_norm(x, residual, weight, bias, epsilon):
    """Returns (normalised, new residual)."""
    residual = x + residual
    return layer_norm(residual, weight, bias, epsilon), residual


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """x [T, H, head_size]; cos/sin [T, rotary_dim / 2]; rotates the first rotary_dim."""
    rot = 2 * cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    x = x.clone()
    part = x[..., :rot]
    if is_neox:
        x1, x2 = part[..., : rot // 2], part[..., rot // 2 :]
        part.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
    else:
        x1, x2 = part[..., 0::2], part[..., 1::2]
        part.copy_(torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2))
    return x


def _apply(x: torch.Tensor, head_size: int, cos, sin, is_neox: bool) -> torch.Tensor:
    heads = x.reshape(x.shape[0], math.prod(x.shape[1:]) // head_size, head_size)
    return _rotate(heads, cos.to(x.dtype), sin.to(x.dtype), is_neox).reshape(x.shape)


def rotary_embedding(positions, query, key, head_size: int, cos_sin_cache, is_neox: bool = True):
    """Returns the rotated (query, key)."""
    half = cos_sin_cache.shape[1] // 2
    angles = cos_sin_cache[positions]
    cos, sin = angles[:, :half], angles[:, half:]
    return (_apply(query, head_size, cos, sin, is_neox), _apply(key, head_size, cos, sin, is_neox))


def mrope_cos_sin(positions, cos_sin_cache, mrope_section: Sequence[int]):
    """Per-token (cos, sin) [T, rotary_dim / 2]: section s of the frequencies
    takes position row s % 3 (transformers' recomposition_frequencies)."""
    half = cos_sin_cache.shape[1] // 2
    angles = cos_sin_cache[positions]  # [3, T, rotary_dim]

    def recompose(table):
        return torch.cat([m[i % 3] for i, m in enumerate(table.split(list(mrope_section), dim=-1))], dim=-1)

    return recompose(angles[..., :half]), recompose(angles[..., half:])


def mrope(positions, query, key, head_size: int, cos_sin_cache, mrope_section, is_neox: bool = True):
    """Returns the rotated (query, key)."""
    cos, sin = mrope_cos_sin(positions, cos_sin_cache, mrope_section)
    return (_apply(query, head_size, cos, sin, is_neox), _apply(key, head_size, cos, sin, is_neox))


def merge_multimodal_embeddings(inputs_embeds, mm_embeds, positions):
    out = inputs_embeds.clone()
    out[positions] = mm_embeds
    return out
