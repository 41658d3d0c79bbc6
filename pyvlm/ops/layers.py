"""Transformer layer ops: RMS norms, LayerNorms, rotary embeddings (plain and Qwen2-VL
mrope) and the merge of multimodal embeddings into the token embeddings.

The norms follow Hugging Face's LlamaRMSNorm / Qwen2RMSNorm rounding order
(x * rsqrt(mean(x^2) + eps) in float32, rounded to the model dtype, then
multiplied by the weight and rounded again) so that logits match transformers.
The LayerNorms follow torch's nn.LayerNorm (float32 statistics, one rounding).
The rotary ops use vLLM's layout: a cos_sin_cache [max_position, rotary_dim]
whose first half of columns holds cos and second half sin (built by
pyvlm.layers.rotary.cos_sin_cache).
"""

from typing import Optional, Sequence

import torch

from ._library import ops


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, epsilon: float, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """RMS norm over the last dimension of a contiguous x, scaled by weight."""
    if out is None:
        out = torch.empty_like(x)
    ops.rms_norm(out, x, weight, epsilon)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual = x + residual (rounded), x = rms_norm(residual) * weight.

    Returns (x, residual), the two updated tensors.
    """
    ops.fused_add_rms_norm(x, residual, weight, epsilon)
    return x, residual


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    epsilon: float,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """nn.LayerNorm over the last dimension of a contiguous x (float32 mean
    and biased variance), scaled by weight and shifted by bias (None: none)."""
    if out is None:
        out = torch.empty_like(x)
    ops.layer_norm(out, x, weight, bias, epsilon)
    return out


def fused_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual = x + residual (rounded), x = layer_norm(residual).

    The statistics are those of the rounded sum, as torch's `r = x + r;
    F.layer_norm(r, ...)`. Returns (x, residual), the two updated tensors.
    """
    ops.fused_add_layer_norm(x, residual, weight, bias, epsilon)
    return x, residual


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates query and key in place by their tokens' positions (int64 [num_tokens]).

    query/key: [num_tokens, num_heads * head_size] or [num_tokens, num_heads,
    head_size], any token stride (e.g. views of a fused qkv projection).
    Only the first rotary_dim = cos_sin_cache.shape[1] elements of each head
    rotate; is_neox pairs (i, i + rotary_dim / 2) as HF's rotate_half, else
    GPT-J's interleaved (2i, 2i + 1). Returns (query, key).
    """
    ops.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)
    return query, key


def mrope(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    mrope_section: Sequence[int],
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL multimodal rotary embedding, in place; returns (query, key).

    positions: int64 [3, num_tokens] (temporal, height, width rows).
    Frequency j takes its angle from the row of the mrope_section entry it
    falls in (entry s uses row s % 3), as transformers' Qwen2-VL. Text-only
    tokens (three equal rows) rotate exactly as rotary_embedding.
    """
    ops.mrope(positions, query, key, head_size, cos_sin_cache, list(mrope_section), is_neox)
    return query, key


def merge_multimodal_embeddings(
    inputs_embeds: torch.Tensor,
    mm_embeds: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    *,
    input_ids: Optional[torch.Tensor] = None,
    placeholder_token_id: Optional[int] = None,
) -> torch.Tensor:
    """In place: inputs_embeds[positions[i]] = mm_embeds[i]; returns inputs_embeds.

    Either give positions (int64 [num_mm], distinct rows) or input_ids and
    placeholder_token_id: positions are then the indices of the placeholder
    tokens, whose count must equal mm_embeds.shape[0] (this form syncs with
    the device to count them).
    """
    if positions is None:
        positions = placeholder_positions(input_ids, placeholder_token_id, mm_embeds.shape[0])
    ops.merge_multimodal_embeddings(inputs_embeds, mm_embeds, positions)
    return inputs_embeds


def placeholder_positions(
    input_ids: Optional[torch.Tensor], placeholder_token_id: Optional[int], num_mm: int
) -> torch.Tensor:
    """Indices of placeholder_token_id in input_ids, checked to number num_mm."""
    if input_ids is None or placeholder_token_id is None:
        raise ValueError("give either positions or both input_ids and placeholder_token_id")
    positions = torch.nonzero(input_ids.reshape(-1) == placeholder_token_id).reshape(-1)
    if positions.numel() != num_mm:
        raise ValueError(
            f"input_ids holds {positions.numel()} placeholder tokens "
            f"(id {placeholder_token_id}) but mm_embeds has {num_mm} rows"
        )
    return positions


@torch.library.register_fake("pyvlm::rms_norm")
def _rms_norm_fake(out, input, weight, epsilon):
    return None


@torch.library.register_fake("pyvlm::fused_add_rms_norm")
def _fused_add_rms_norm_fake(input, residual, weight, epsilon):
    return None


@torch.library.register_fake("pyvlm::layer_norm")
def _layer_norm_fake(out, input, weight, bias, epsilon):
    return None


@torch.library.register_fake("pyvlm::fused_add_layer_norm")
def _fused_add_layer_norm_fake(input, residual, weight, bias, epsilon):
    return None


@torch.library.register_fake("pyvlm::rotary_embedding")
def _rotary_embedding_fake(positions, query, key, head_size, cos_sin_cache, is_neox):
    return None


@torch.library.register_fake("pyvlm::mrope")
def _mrope_fake(positions, query, key, head_size, cos_sin_cache, mrope_section, is_neox):
    return None


@torch.library.register_fake("pyvlm::merge_multimodal_embeddings")
def _merge_multimodal_embeddings_fake(inputs_embeds, mm_embeds, positions):
    return None
