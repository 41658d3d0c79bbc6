"""Attention of a few queries over many keys, split along the keys.

FlashAttention runs a block per 128 queries and head: a segment of a few
dozen queries over thousands of keys (mllama's padding patches over an
image's 6,404 real patches) gets one block per head, 16 blocks on a card
of 132 SMs, each walking every key in turn (0.17 ms a layer on an H100
for a few MFLOPs). Cutting each segment's keys into chunks gives every
chunk its own blocks; the chunks' outputs then merge by their
log-sum-exps, as flash-decoding's split-K does, here on packed varlen rows.
"""

import itertools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

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


def key_split_count(query_lengths: Sequence[int], key_lengths: Sequence[int]) -> int:
    """How many chunks each segment's keys are cut into; 1 where splitting
    does not pay: a segment of many queries, or too few keys (in any
    segment) for two chunks."""
    num_splits = min(MAX_SPLITS, min(key_lengths) // MIN_KEYS_PER_SPLIT)
    return 1 if max(query_lengths) > MAX_QUERIES or num_splits < 2 else num_splits


def _chunk(length: int, num_splits: int, index: int) -> Tuple[int, int]:
    return length * index // num_splits, length * (index + 1) // num_splits


def plan_key_splits(query_lengths: Sequence[int], key_rows: Sequence[torch.Tensor],
                    device: torch.device) -> Optional[KeySplits]:
    """The plan for segments of query_lengths[i] queries over the key rows
    key_rows[i] (CPU int64); None where splitting does not pay
    (key_split_count)."""
    num_splits = key_split_count(query_lengths, [len(rows) for rows in key_rows])
    if num_splits == 1:
        return None
    chunks = [rows[slice(*_chunk(len(rows), num_splits, s))]
              for s in range(num_splits) for rows in key_rows]
    key_lengths = [len(chunk) for chunk in chunks]
    return KeySplits(num_splits, torch.cat(chunks).to(device, non_blocking=True),
                     _cu(list(query_lengths) * num_splits, device), _cu(key_lengths, device),
                     max(query_lengths), max(key_lengths))


def packed_split_lists(query_lengths: Sequence[int], key_lengths: Sequence[int],
                       num_splits: int) -> Tuple[torch.Tensor, List[int], List[int]]:
    """A plan's key_rows (a CPU int64 tensor), cu_q and cu_k (lists) on
    the host, for segments whose keys lie packed in order (segment i's
    key_lengths[i] rows right after segment i-1's): for callers that move
    them to the device with the rest of a step's lists (KeySplits of
    their tensors)."""
    starts = list(itertools.accumulate(key_lengths, initial=0))
    rows, chunk_lengths = [], []
    for s in range(num_splits):
        for start, length in zip(starts, key_lengths):
            begin, end = _chunk(length, num_splits, s)
            rows.append(torch.arange(start + begin, start + end))
            chunk_lengths.append(end - begin)
    cu_q = list(itertools.accumulate(list(query_lengths) * num_splits, initial=0))
    return torch.cat(rows), cu_q, list(itertools.accumulate(chunk_lengths, initial=0))


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
