"""Attention of a few queries over many keys, split along the keys.

FlashAttention runs a block per 128 queries and head: a segment of a few
dozen queries over thousands of keys (mllama's padding patches over an
image's 6,404 real patches) gets one block per head, 16 blocks on a card
of 132 SMs, each walking every key in turn (0.17 ms a layer on an H100
for a few MFLOPs). Cutting each segment's keys into chunks gives every
chunk its own blocks; the chunks' outputs then merge by their
log-sum-exps, as flash-decoding's split-K does, here on packed varlen rows.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from .packed_attention import flash_attention_with_lse

# A chunk shorter than this costs more in launch and merge than it saves.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 16
# One FlashAttention query block: more queries than this fill the card anyway.
MAX_QUERIES = 128

AttendWithLse = Callable[..., Tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class KeySplits:
    """A plan: each segment's keys cut into num_splits chunks. key_rows
    (int64) are rows of the full key/value tensors, chunk-major (chunk 0 of
    every segment, then chunk 1, ...); cu_q / cu_k (int32) bound the
    num_splits x segments sub-segments in that order."""

    num_splits: int
    key_rows: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def _cu(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    bounds = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    return bounds.to(torch.int32).to(device, non_blocking=True)


def plan_key_splits(query_lengths: Sequence[int], key_rows: Sequence[torch.Tensor],
                    device: torch.device) -> Optional[KeySplits]:
    """The plan for segments of query_lengths[i] queries over the key rows
    key_rows[i] (CPU int64); None where splitting does not pay: a segment
    of many queries, or too few keys for two chunks."""
    num_splits = min(MAX_SPLITS, min(len(rows) for rows in key_rows) // MIN_KEYS_PER_SPLIT)
    if max(query_lengths) > MAX_QUERIES or num_splits < 2:
        return None
    chunks = [rows[len(rows) * s // num_splits:len(rows) * (s + 1) // num_splits]
              for s in range(num_splits) for rows in key_rows]
    key_lengths = [len(chunk) for chunk in chunks]
    return KeySplits(num_splits, torch.cat(chunks).to(device, non_blocking=True),
                     _cu(list(query_lengths) * num_splits, device), _cu(key_lengths, device),
                     max(query_lengths), max(key_lengths))


def merge_splits(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Chunk outputs [splits, rows, heads, head_dim] and their float32
    log-sum-exps [heads, splits, rows] -> the attention over all chunks
    [rows, heads, head_dim], in float32 (or the lse's wider type): each chunk weighted by its share of the
    softmax's denominator (a softmax of the lse over the chunks)."""
    dtype = torch.promote_types(lse.dtype, torch.float32)
    return torch.einsum("srhd,hsr->rhd", out.to(dtype), torch.softmax(lse.to(dtype), dim=1))


def split_key_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        splits: KeySplits, scale: float,
                        attend: AttendWithLse = flash_attention_with_lse) -> torch.Tensor:
    """query [rows, heads, head_dim] (segments in order); key/value the full
    tensors splits.key_rows index. attend(q, k, v, cu_q, cu_k, max_q,
    max_k, scale) -> (out, lse [heads, rows]), non-causal varlen attention
    (FlashAttention's on CUDA). Returns [rows, heads, head_dim] in query's dtype."""
    num_splits, rows = splits.num_splits, query.shape[0]
    out, lse = attend(query.repeat(num_splits, 1, 1), key.index_select(0, splits.key_rows),
                      value.index_select(0, splits.key_rows), splits.cu_q, splits.cu_k,
                      splits.max_q, splits.max_k, scale)
    merged = merge_splits(out.view(num_splits, rows, *out.shape[1:]),
                          lse.view(lse.shape[0], num_splits, rows))
    return merged.to(query.dtype)
