"""Pure-torch references for the paged KV cache ops."""

from typing import Tuple

import torch


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns copies of the caches with token t written at slot_mapping[t]
    (negative slots skipped)."""
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    num_pages, page_size = key_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat_k = key_cache.view(num_pages * page_size, *key_cache.shape[2:])
    flat_v = value_cache.view(num_pages * page_size, *value_cache.shape[2:])
    flat_k[slots] = key[keep].to(key_cache.dtype)
    flat_v[slots] = value[keep].to(value_cache.dtype)
    return key_cache, value_cache


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A sequence's first seq_len cached rows, [seq_len, num_kv_heads, head_dim]."""
    page_size = cache.shape[1]
    num_pages = (seq_len + page_size - 1) // page_size
    pages = cache[block_table[:num_pages].long()]
    return pages.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain softmax attention of each sequence's query over its gathered pages."""
    num_seqs, num_heads, head_dim = query.shape
    group = num_heads // key_cache.shape[2]
    out = torch.zeros(num_seqs, num_heads, head_dim, dtype=query.dtype, device=query.device)
    for s in range(num_seqs):
        seq_len = int(seq_lens[s])
        if seq_len == 0:
            continue
        k = gather_pages(key_cache, block_tables[s], seq_len).repeat_interleave(group, dim=1)
        v = gather_pages(value_cache, block_tables[s], seq_len).repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", query[s], k.to(query.dtype)) * scale
        out[s] = torch.einsum("ht,thd->hd", scores.softmax(dim=-1), v.to(query.dtype))
    return out
