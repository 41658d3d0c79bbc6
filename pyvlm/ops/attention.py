"""Paged KV cache writes and single-token (decode) attention over the cache.

The cache of one layer is a pair of tensors [num_pages, page_size,
num_kv_heads, head_dim]; token slot s lives on page s // page_size at offset
s % page_size. A sequence's block table lists its pages in order.
"""

import math
from typing import Optional

import torch

from ._library import ops


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes key[t] and value[t] ([num_tokens, num_kv_heads, head_dim]) into
    slot slot_mapping[t] (int64) of the caches, in place.

    Negative slots are skipped (padding tokens); key and value may be strided
    views (only their last dimension must be contiguous).
    """
    ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its cached context.

    query: [num_seqs, num_heads, head_dim]; block_tables: int32 [num_seqs,
    max_pages_per_seq]; seq_lens: int32 [num_seqs], the number of cached
    tokens each sequence attends to (0 gives a zero output). num_heads must be
    a multiple of the caches' num_kv_heads (GQA/MQA). scale defaults to
    1/sqrt(head_dim). Returns out, [num_seqs, num_heads, head_dim].
    """
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    ops.paged_attention_decode(out, query, key_cache, value_cache, block_tables, seq_lens,
                               float(scale))
    return out


@torch.library.register_fake("pyvlm::reshape_and_cache")
def _reshape_and_cache_fake(key, value, key_cache, value_cache, slot_mapping):
    return None


@torch.library.register_fake("pyvlm::paged_attention_decode")
def _paged_attention_decode_fake(out, query, key_cache, value_cache, block_tables, seq_lens,
                                 scale):
    return None
