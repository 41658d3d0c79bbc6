"""Rotary position embeddings of Llama/Qwen2, with HF's rope_parameters.

Supported rope types: default, linear and llama3 (the ones whose cos/sin do
not depend on the sequence length); others raise with the type's name.
Qwen2-VL's multimodal rotary (M-RoPE: rope parameters with an
mrope_section) rotates by three position rows: `MRotaryEmbedding`.

This module also owns the cos/sin table the rotary ops take (vLLM's layout:
[max_position, rotary_dim], cos in the first half of the columns, sin in the
second); pyvlm.ops only wraps the kernels that read it.
"""

import math
from typing import Any, Dict, Optional

import torch
from torch import nn

from pyvlm import ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters_of(config) -> Dict[str, Any]:
    """The text config's rope parameters as one dict (transformers 5's
    rope_parameters, or the older rope_theta + rope_scaling fields)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    scaling = getattr(config, "rope_scaling", None) or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] == "mrope":  # Qwen2-VL's original configs: default frequencies
        params["rope_type"] = "default"
    return params


def default_inv_freq(rotary_dim: int, base: float,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """1 / base^(2i / dim) in float32, computed as transformers does."""
    exponents = (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device)
                 .to(torch.float) / rotary_dim)
    return 1.0 / (base ** exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, params: Dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling (transformers' _compute_llama3_parameters)."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def inv_freq_for(rotary_dim: int, params: Dict[str, Any]) -> torch.Tensor:
    """The inverse frequencies of a rope parameter dict."""
    rope_type = params["rope_type"]
    inv_freq = default_inv_freq(rotary_dim, params["rope_theta"])
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        return llama3_inv_freq(inv_freq, params)
    raise NotImplementedError(f"rope type {rope_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def cos_sin_cache(inv_freq: torch.Tensor, max_position: int) -> torch.Tensor:
    """[max_position, rotary_dim] float32 table on inv_freq's device: cos in
    the first half, sin in the second (angles = position * inv_freq, as
    transformers' rotary embedding modules compute them)."""
    positions = torch.arange(max_position, dtype=torch.float, device=inv_freq.device)
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates query and key in place by their positions (neox layout, as
    HF's rotate_half). The cos/sin table is a non-persistent float32 buffer."""

    def __init__(self, head_dim: int, max_position: int, params: Dict[str, Any],
                 rotary_dim: Optional[int] = None):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = inv_freq_for(rotary_dim or head_dim, params)
        self.register_buffer("cos_sin_cache", cos_sin_cache(inv_freq, max_position),
                             persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        """positions int64 [T]; query/key [T, heads * head_dim] (strided views ok)."""
        if self.cos_sin_cache.dtype != query.dtype:
            # The kernels take the table in the activations' dtype; transformers
            # also rounds cos/sin to the model dtype before rotating.
            self.cos_sin_cache = self.cos_sin_cache.to(query.dtype)
        return ops.rotary_embedding(positions, query, key, self.head_dim, self.cos_sin_cache)


class MRotaryEmbedding(RotaryEmbedding):
    """Qwen2-VL's M-RoPE: frequency j of a head takes its angle from the
    position row of the mrope_section entry it falls in (temporal, height,
    width, as transformers' Qwen2VLRotaryEmbedding recomposes them)."""

    def __init__(self, head_dim: int, max_position: int, params: Dict[str, Any]):
        super().__init__(head_dim, max_position, params)
        self.mrope_section = [int(s) for s in params["mrope_section"]]
        if sum(self.mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to half the head "
                             f"dimension ({head_dim // 2})")

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        """positions int64 [3, T] (rows temporal, height, width)."""
        if positions.dim() != 2 or positions.shape[0] != 3:
            raise ValueError(f"M-RoPE needs positions of shape [3, T], got {tuple(positions.shape)}")
        if self.cos_sin_cache.dtype != query.dtype:
            self.cos_sin_cache = self.cos_sin_cache.to(query.dtype)
        return ops.mrope(positions, query, key, self.head_dim, self.cos_sin_cache,
                         self.mrope_section)


def rotary_for(head_dim: int, max_position: int, params: Dict[str, Any]) -> RotaryEmbedding:
    """M-RoPE when the rope parameters name an mrope_section, else 1-D rotary."""
    if params.get("mrope_section"):
        return MRotaryEmbedding(head_dim, max_position, params)
    return RotaryEmbedding(head_dim, max_position, params)
