"""Attention within packed sequences by the fastest kernel at hand: the
vision towers' non-causal attention (every image or tile attends only to
itself), and the causal attention of whole fresh prompts over their own rows.

On CUDA with 16-bit inputs that is torch's bundled FlashAttention-2
(torch.nn.attention.varlen.varlen_attn, and the ATen op under it) where this
torch has it: on an H100 it runs the Qwen2-VL tower's 1,564-row attention
2.7x faster than pyvlm's mma.sync kernel (benchmarks/RESULTS.md,
"Vision-tower attention"), as vLLM also runs its towers on FlashAttention.
Everywhere else (CPU, float32, an older torch, a head size FlashAttention
does not take) the towers run ops.varlen_attention and prompts pyvlm's
paged prefill kernel. Both accumulate in float32; they differ only in the
order of the sums. PYVLM_PACKED_ATTENTION=pyvlm forces pyvlm's kernels
(for A/B runs).
"""

import inspect
import os
from typing import Callable, Optional

import torch

from .. import ops

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


def _torch_flash_varlen() -> Optional[Callable]:
    if os.environ.get("PYVLM_PACKED_ATTENTION", "") == "pyvlm":
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    if "scale" not in inspect.signature(varlen_attn).parameters:  # torch 2.9's first form
        return None
    return varlen_attn


_FLASH_VARLEN = _torch_flash_varlen()
# Causal masks and fewer key/value heads (GQA): varlen_attn's keywords for
# them changed between torch releases (is_causal; window_size, enable_gqa),
# so those calls go to the ATen op under every form of it, which has taken
# (..., dropout_p, is_causal, return_debug_mask, *, scale) since torch 2.2
# and GQA natively (FlashAttention-2).
_FLASH_FORWARD = getattr(torch.ops.aten, "_flash_attention_forward", None)
_FLASH_CAUSAL_GQA = _FLASH_VARLEN is not None and _FLASH_FORWARD is not None


def takes_torch_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      causal: bool = False) -> bool:
    """Whether torch's FlashAttention takes these inputs ([rows, heads,
    head_dim] each): CUDA, 16-bit, a head size it supports, unit-stride rows."""
    head_dim, num_heads, num_kv_heads = query.shape[-1], query.shape[1], key.shape[1]
    if _FLASH_VARLEN is None or ((causal or num_kv_heads != num_heads) and not _FLASH_CAUSAL_GQA):
        return False
    return (query.is_cuda and query.dtype in _FLASH_DTYPES
            and key.dtype == value.dtype == query.dtype and head_dim % 8 == 0
            and head_dim <= _FLASH_MAX_HEAD_DIM and key.shape[-1] == value.shape[-1] == head_dim
            and value.shape[1] == num_kv_heads and num_heads % num_kv_heads == 0
            and query.shape[0] > 0 and key.shape[0] > 0
            and all(t.stride(-1) == 1 for t in (query, key, value)))


def _flash(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
           causal):
    if not causal and key.shape[1] == query.shape[1]:
        return _FLASH_VARLEN(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, scale=scale)
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
    only where takes_torch_flash(query, key, value, causal=True). Returns
    [rows, heads, head_dim]."""
    return _flash(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  scale, causal=True)
