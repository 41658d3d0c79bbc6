"""Attention within packed sequences by the fastest kernel at hand: the
vision towers' non-causal attention (every image or tile attends only to
itself), and the causal attention of prompts over their keys.

On CUDA with 16-bit inputs that is torch's bundled FlashAttention-2 (the
ATen op under torch.nn.attention.varlen.varlen_attn) where this torch has
it: on an H100 it runs the Qwen2-VL tower's 1,564-row attention
2.7x faster than pyvlm's mma.sync kernel (benchmarks/RESULTS.md,
"Vision-tower attention"), as vLLM also runs its towers on FlashAttention.
Everywhere else (CPU, float32, an older torch, a head size FlashAttention
does not take) the towers run ops.varlen_attention and prompts pyvlm's
paged prefill kernel. Both accumulate in float32; they differ only in the
order of the sums. PYVLM_PACKED_ATTENTION=pyvlm forces pyvlm's kernels
(for A/B runs).
"""

import importlib.util
import os

import torch

from .. import ops

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


def _torch_ships_flash_varlen() -> bool:
    """Whether this torch has FlashAttention varlen (torch.nn.attention.varlen,
    torch >= 2.9) and the ATen op under it, unless PYVLM_PACKED_ATTENTION=pyvlm."""
    if os.environ.get("PYVLM_PACKED_ATTENTION", "") == "pyvlm":
        return False
    try:
        has_varlen = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except ImportError:
        return False
    return has_varlen and _FLASH_FORWARD is not None


# Calls go to the ATen op under varlen_attn rather than to varlen_attn, a
# Python custom op that also allocates and zeroes an RNG state per call: on
# an H200 its host time per call left the device idle between the towers'
# short attention kernels (16.9 ms of gaps in LLaVA-OneVision-7B's TTFT
# step). The ATen op has taken (..., dropout_p, is_causal,
# return_debug_mask, *, scale) since torch 2.2, and fewer key/value heads
# natively (FlashAttention-2).
_FLASH_FORWARD = getattr(torch.ops.aten, "_flash_attention_forward", None)
_FLASH_AVAILABLE = _torch_ships_flash_varlen()


def takes_torch_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether torch's FlashAttention takes these inputs ([rows, heads,
    head_dim] each; causal or not, fewer key/value heads or not): CUDA,
    16-bit, a head size it supports, unit-stride rows."""
    head_dim, num_heads, num_kv_heads = query.shape[-1], query.shape[1], key.shape[1]
    return (_FLASH_AVAILABLE and query.is_cuda and query.dtype in _FLASH_DTYPES
            and key.dtype == value.dtype == query.dtype and head_dim % 8 == 0
            and head_dim <= _FLASH_MAX_HEAD_DIM and key.shape[-1] == value.shape[-1] == head_dim
            and value.shape[1] == num_kv_heads and num_heads % num_kv_heads == 0
            and query.shape[0] > 0 and key.shape[0] > 0
            and all(t.stride(-1) == 1 for t in (query, key, value)))


def _flash(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
           causal):
    return _FLASH_FORWARD(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, 0.0, causal, False, scale=scale)[0]


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, scale: float) -> torch.Tensor:
    """ops.varlen_attention's contract (query [total_q, heads, head_dim],
    key/value [total_k, kv_heads, head_dim], int32 cu_seqlens; returns
    [total_q, heads, head_dim]), by torch's FlashAttention where it applies."""
    if takes_torch_flash(query, key, value):
        return _flash(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      scale, causal=False)
    return ops.varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                max_seqlen_k, scale)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, scale: float) -> torch.Tensor:
    """Causal attention of packed prompt rows over their sequences' keys,
    aligned bottom-right (a sequence's last query sees all of its keys: the
    new rows of a prompt whose prefix is cached), by torch's FlashAttention;
    only where takes_torch_flash(query, key, value). Returns
    [rows, heads, head_dim]."""
    return _flash(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  scale, causal=True)
