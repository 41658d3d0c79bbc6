"""Prefill-side attention: paged prefill/extend over a KV cache, and
block-diagonal attention over packed variable-length sequences."""

from typing import Optional

import torch

from ._library import ops


def _out_like(query: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    return out


def paged_attention_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention of new tokens over a paged KV cache (prefill, extend,
    chunked prefill, prefix-cache hits).

    query: [total_new_tokens, num_heads, head_dim], packed by cu_seqlens_q
    (int32 [num_seqs + 1]). key_cache/value_cache: [num_pages, page_size,
    num_kv_heads, head_dim], already holding every new token's K/V after the
    prefix_lens[s] (int32 [num_seqs]) cached tokens of sequence s.
    block_tables: int32 [num_seqs, max_pages_per_seq]. New token i of
    sequence s attends to cache positions [0, prefix_lens[s] + i].
    max_seqlen_q must be >= every new span (it sizes the CUDA grid without a
    host sync). Returns out [total_new_tokens, num_heads, head_dim].
    """
    out = _out_like(query, out)
    ops.paged_attention_prefill(
        out, query, key_cache, value_cache, block_tables, cu_seqlens_q, prefix_lens,
        max_seqlen_q, scale,
    )
    return out


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Non-causal attention within each of several packed sequences (vision
    towers over images of different sizes; cross-attention).

    query: [total_q, num_heads, head_dim]; key/value: [total_k, num_kv_heads,
    head_dim]; the last dimension contiguous, other strides free (views into
    a fused qkv projection work). Query rows [cu_seqlens_q[s],
    cu_seqlens_q[s + 1]) attend to key rows [cu_seqlens_k[s],
    cu_seqlens_k[s + 1]); a sequence with no keys gives zeros. max_seqlen_*
    must be >= every span. Returns a contiguous out [total_q, num_heads,
    head_dim].
    """
    out = _out_like(query, out)
    ops.varlen_attention(
        out, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale
    )
    return out


@torch.library.register_fake("pyvlm::paged_attention_prefill")
def _paged_attention_prefill_fake(
    out, query, key_cache, value_cache, block_tables, cu_seqlens_q, prefix_lens, max_seqlen_q,
    scale,
):
    return None


@torch.library.register_fake("pyvlm::varlen_attention")
def _varlen_attention_fake(
    out, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale
):
    return None
