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
order of the sums.

Segments of one length (a tower's tiles, one image's frames, mllama's
images padded alike) are a dense batch: there cuDNN's fused attention
(torch's, Hopper and later) runs 1.35-1.5x faster than FlashAttention-2
at the towers' head size of 80 on an H100 (benchmarks/RESULTS.md, "SDPA
backends"), where a caller says equal_lengths. cuDNN may refuse a shape
(its version, the card): the first call of each head size and dtype
finds out, and a refusal sends that kind back to FlashAttention for good.

PYVLM_PACKED_ATTENTION=pyvlm forces pyvlm's kernels, =flash FlashAttention
without cuDNN (for A/B runs), =wgmma the towers' non-causal attention on
pyvlm's op where it runs its Hopper kernel (an sm_90 device: wgmma from
shared memory, csrc/kernels/cuda/attention_sm90.cuh) and everything else
as by default. =wgmma also turns that kernel on in the op, in the form
PYVLM_SM90_ATTENTION names (its default form when unset; the op reads the
variable at its first such call, csrc/README.md). Both are opt-in until the
device benchmarks put the kernel ahead of cuDNN at the towers' head size
of 80.
"""

import importlib.util
import logging
import os
from typing import Dict, Optional, Tuple

import torch

logger = logging.getLogger(__name__)
_FORCED = os.environ.get("PYVLM_PACKED_ATTENTION", "")
if _FORCED == "wgmma":  # before the op's first call reads it (this process and its children)
    os.environ.setdefault("PYVLM_SM90_ATTENTION", "1")

from .. import ops

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


def _torch_ships_flash_varlen() -> bool:
    """Whether this torch has FlashAttention varlen (torch.nn.attention.varlen,
    torch >= 2.9) and the ATen op under it, unless PYVLM_PACKED_ATTENTION=pyvlm."""
    if _FORCED == "pyvlm":
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


def _tensor_core_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       max_head_dim: int) -> bool:
    """What the 16-bit CUDA attention kernels ask of [rows, heads, head_dim]
    inputs: CUDA, one 16-bit dtype, a head size that is a multiple of 8 up
    to max_head_dim, as many key as value heads dividing the query heads,
    rows on both sides, unit-stride rows."""
    head_dim, num_heads, num_kv_heads = query.shape[-1], query.shape[1], key.shape[1]
    return (query.is_cuda and query.dtype in _FLASH_DTYPES
            and key.dtype == value.dtype == query.dtype and head_dim % 8 == 0
            and head_dim <= max_head_dim and key.shape[-1] == value.shape[-1] == head_dim
            and value.shape[1] == num_kv_heads and num_heads % num_kv_heads == 0
            and query.shape[0] > 0 and key.shape[0] > 0
            and all(t.stride(-1) == 1 for t in (query, key, value)))


def takes_torch_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether torch's FlashAttention takes these inputs ([rows, heads,
    head_dim] each; causal or not, fewer key/value heads or not): CUDA,
    16-bit, a head size it supports, unit-stride rows."""
    return _FLASH_AVAILABLE and _tensor_core_heads(query, key, value, _FLASH_MAX_HEAD_DIM)


_WGMMA_MAX_HEAD_DIM = 128
_capabilities: Dict[int, Tuple[int, int]] = {}


def takes_pyvlm_wgmma(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether PYVLM_PACKED_ATTENTION=wgmma sends these inputs to pyvlm's
    op, and the op runs them on its sm_90 wgmma kernel: the tensor-core
    conditions with head sizes up to 128, rows that start 16-byte aligned
    (the op's cp.async tiles), an sm_90 device."""
    if _FORCED != "wgmma" or not _tensor_core_heads(query, key, value, _WGMMA_MAX_HEAD_DIM):
        return False
    vec = 16 // query.element_size()
    if not all(t.data_ptr() % 16 == 0 and t.stride(0) % vec == 0 and t.stride(1) % vec == 0
               for t in (query, key, value)):
        return False
    index = query.device.index  # a CUDA tensor's device always names its index
    if index not in _capabilities:
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities[index] == (9, 0)


# The ATen op under scaled_dot_product_attention's cuDNN backend, called
# directly for the same reason as FlashAttention's (no per-call backend
# selection on the host).
_CUDNN_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
_CUDNN_MAX_HEAD_DIM = 128
# (device index, dtype, head_dim) -> whether cuDNN ran it (module docstring)
_cudnn_runs: Dict[Tuple[Optional[int], torch.dtype, int], bool] = {}


def takes_cudnn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether cuDNN's attention may take these packed rows as a dense
    batch: FlashAttention's conditions, as many key/value heads as query
    heads, a head size cuDNN takes, and no refusal of this kind before."""
    head_dim = query.shape[-1]
    return (_FORCED not in ("pyvlm", "flash") and _CUDNN_FORWARD is not None
            and takes_torch_flash(query, key, value) and key.shape[1] == query.shape[1]
            and head_dim <= _CUDNN_MAX_HEAD_DIM and torch.backends.cudnn.is_available()
            and _cudnn_runs.get((query.device.index, query.dtype, head_dim), True))


def _cudnn_dense(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seq_len: int,
                 scale: float) -> Optional[torch.Tensor]:
    """Attention within consecutive segments of seq_len rows, as one dense
    [segments, heads, seq_len, head_dim] batch through cuDNN (the rows'
    layout as it is: a transposed view); None when cuDNN refuses it."""
    segments = query.shape[0] // seq_len
    q, k, v = (t.unflatten(0, (segments, seq_len)).transpose(1, 2) for t in (query, key, value))
    kind = (query.device.index, query.dtype, query.shape[-1])
    try:
        out = _CUDNN_FORWARD(q, k, v, None, False, 0.0, False, False, scale=scale)[0]
    except RuntimeError as exc:
        if _cudnn_runs.get(kind):
            raise  # it ran this kind before: a real error
        _cudnn_runs[kind] = False
        logger.warning("cuDNN attention refused %s head size %d (%s); FlashAttention runs it",
                       query.dtype, query.shape[-1], str(exc).splitlines()[0][:200])
        return None
    _cudnn_runs[kind] = True
    return out.transpose(1, 2).reshape(query.shape)


def _flash(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
           causal):
    return _FLASH_FORWARD(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, 0.0, causal, False, scale=scale)[0]


def flash_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                             max_seqlen_q: int, max_seqlen_k: int, scale: float
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Non-causal packed attention by torch's FlashAttention (inputs that
    takes_torch_flash accepts) and its float32 log-sum-exp per head and
    query row, [heads, total_q] (FlashAttention-2's varlen layout)."""
    out, lse = _FLASH_FORWARD(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, 0.0, False, False, scale=scale)[:2]
    if tuple(lse.shape) != (query.shape[1], query.shape[0]):
        raise RuntimeError(f"FlashAttention's log-sum-exp has shape {tuple(lse.shape)}, "
                           f"not [heads, rows] = {(query.shape[1], query.shape[0])}")
    return out, lse


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, scale: float, equal_lengths: bool = False
                     ) -> torch.Tensor:
    """ops.varlen_attention's contract (query [total_q, heads, head_dim],
    key/value [total_k, kv_heads, head_dim], int32 cu_seqlens; returns
    [total_q, heads, head_dim]), by cuDNN or torch's FlashAttention where
    they apply. equal_lengths: the caller knows every segment is
    max_seqlen_q == max_seqlen_k rows long (a dense batch for cuDNN)."""
    if takes_pyvlm_wgmma(query, key, value):
        return ops.varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, scale)
    if (equal_lengths and max_seqlen_q == max_seqlen_k and query.shape[0] == key.shape[0]
            and query.shape[0] % max(max_seqlen_q, 1) == 0 and takes_cudnn(query, key, value)):
        out = _cudnn_dense(query, key, value, max_seqlen_q, scale)
        if out is not None:
            return out
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
