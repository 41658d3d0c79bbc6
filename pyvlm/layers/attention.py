"""Attention over the paged KV cache, and the per-step metadata it needs.

The model runner builds one `AttentionMetadata` per forward from plain
lists; every layer's `PagedAttention` writes the new tokens' K/V into its
cache pages and attends over the cached context (prefill/extend/chunked
prefill, or one decode token per sequence).
"""

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pyvlm import ops
from pyvlm.ops.host_upload import HostUpload

from .packed_attention import causal_attention, takes_torch_flash

# (start_pos, num_new_tokens, page_table) of one sequence in the step.
ChunkSpan = Tuple[int, int, Sequence[int]]


def slots_of(start_pos: int, num_new_tokens: int, page_table: Sequence[int],
             page_size: int) -> List[int]:
    """KV cache slots of positions start_pos .. start_pos + num_new_tokens - 1."""
    positions = range(start_pos, start_pos + num_new_tokens)
    return [page_table[pos // page_size] * page_size + pos % page_size for pos in positions]


def padded_block_tables(page_tables: List[Sequence[int]]) -> List[List[int]]:
    """Page tables padded with page 0 to a rectangle (padding is never read)."""
    max_pages = max([len(table) for table in page_tables] + [1])
    return [list(table) + [0] * (max_pages - len(table)) for table in page_tables]


def cumulative(lengths: Sequence[int]) -> List[int]:
    """[0, l0, l0 + l1, ...]: the packed start offset of each sequence."""
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return offsets


@dataclass
class AttentionMetadata:
    """Where the step's tokens go in the cache and what each one attends to.

    slot_mapping: int64 [num_tokens]; block_tables: int32 [num_seqs,
    max_pages]. Decode: seq_lens int32 [num_seqs], each context length
    including the new token. Prefill: cu_seqlens_q int32 [num_seqs + 1],
    prefix_lens int32 [num_seqs] (tokens already cached), max_seqlen_q.

    A prefill step whose last chunks are single tokens (the running
    requests' decodes in a mixed step) gives them to the decode kernel:
    block_tables, cu_seqlens_q and prefix_lens then cover the first
    num_prefill_tokens rows' sequences only, and decode_block_tables /
    decode_seq_lens the single tokens after them. The prefill kernel tiles
    its queries by 64-128 rows per sequence and reads K/V per query head; a
    lone decode query would waste its tile and re-read the context for
    every head of a GQA group.

    fresh_prefill: every prefill sequence starts at position 0 (nothing of
    it cached), so its keys are exactly the step's own key rows and its
    attention needs no cache read (pyvlm.layers.packed_attention).
    page_size, num_prefill_keys and max_seqlen_k (host-known) size the
    gather of the prefill sequences' whole keys from the cache for
    FlashAttention otherwise (PrefillKeys, built once per step on the
    device).
    """

    is_decode: bool
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: Optional[torch.Tensor] = None
    cu_seqlens_q: Optional[torch.Tensor] = None
    prefix_lens: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    num_prefill_tokens: Optional[int] = None  # None: every row is prefill (or decode)
    decode_block_tables: Optional[torch.Tensor] = None
    decode_seq_lens: Optional[torch.Tensor] = None
    fresh_prefill: bool = False
    page_size: int = 0
    num_prefill_keys: int = 0
    max_seqlen_k: int = 0
    # A cross-attention family's per-step image inputs (the model builds
    # them: pyvlm.models.mllama_cross_inputs); None for every other step.
    cross_attention: Optional[object] = None
    _prefill_keys: Optional["PrefillKeys"] = field(default=None, init=False, repr=False,
                                                   compare=False)

    def prefill_keys(self) -> "PrefillKeys":
        """The step's PrefillKeys, built on first use."""
        if self._prefill_keys is None:
            self._prefill_keys = PrefillKeys(self)
        return self._prefill_keys

    @classmethod
    def build(cls, chunks: List[ChunkSpan], page_size: int, is_decode: bool,
              device=None) -> "AttentionMetadata":
        """Builds the tensors of a step from each sequence's (start_pos,
        num_new_tokens, page_table); decode steps take one token each."""
        upload = HostUpload()
        make = cls.stage(chunks, page_size, is_decode, upload)
        upload.to(device if device is not None else "cpu")
        return make()

    @classmethod
    def stage(cls, chunks: List[ChunkSpan], page_size: int, is_decode: bool,
              upload: HostUpload) -> Callable[[], "AttentionMetadata"]:
        """Adds the step's index lists to `upload` (the runner moves a whole
        step's lists in one copy); the returned callable builds the metadata
        once upload.to() has run."""
        if is_decode and any(num_new != 1 for _, num_new, _ in chunks):
            raise ValueError("a decode step runs exactly one new token per sequence")
        slots = [slot for start, num_new, table in chunks
                 for slot in slots_of(start, num_new, table, page_size)]
        common = dict(slot_mapping=upload.add(slots, torch.int64),
                      block_tables=upload.add(padded_block_tables([c[2] for c in chunks]),
                                              torch.int32))
        if is_decode:
            extra = dict(seq_lens=upload.add([start + 1 for start, _, _ in chunks], torch.int32))
            max_seqlen_q, num_prefill_tokens, fresh_prefill = 0, None, False
            key_lens = []
        else:
            prefill, tail = _split_single_token_tail(chunks)
            num_new_tokens = [num_new for _, num_new, _ in prefill]
            extra = dict(cu_seqlens_q=upload.add(cumulative(num_new_tokens), torch.int32),
                         prefix_lens=upload.add([start for start, _, _ in prefill], torch.int32))
            max_seqlen_q = max(num_new_tokens + [0])
            fresh_prefill = all(start == 0 for start, _, _ in prefill)
            key_lens = [start + num_new for start, num_new, _ in prefill]
            num_prefill_tokens = None
            if tail:
                num_prefill_tokens = sum(num_new_tokens)
                common["block_tables"] = upload.add(
                    padded_block_tables([c[2] for c in prefill]), torch.int32)
                extra["decode_block_tables"] = upload.add(
                    padded_block_tables([c[2] for c in tail]), torch.int32)
                extra["decode_seq_lens"] = upload.add([start + 1 for start, _, _ in tail],
                                                      torch.int32)

        def make() -> "AttentionMetadata":
            tensors = {name: pending.tensor for name, pending in {**common, **extra}.items()}
            return cls(is_decode=is_decode, max_seqlen_q=max_seqlen_q,
                       num_prefill_tokens=num_prefill_tokens, fresh_prefill=fresh_prefill,
                       page_size=page_size, num_prefill_keys=sum(key_lens),
                       max_seqlen_k=max(key_lens + [0]), **tensors)

        return make


class PrefillKeys:
    """Where the prefill sequences' whole keys (cached prefix and new rows)
    lie in the cache, built on the device from the block tables without a
    host sync: slots int64 [num_prefill_keys] and cu_seqlens_k int32
    [num_seqs + 1]. One per step, shared by every layer (AttentionMetadata
    caches it)."""

    def __init__(self, attn: "AttentionMetadata"):
        q_lens = attn.cu_seqlens_q[1:] - attn.cu_seqlens_q[:-1]
        key_lens = attn.prefix_lens + q_lens
        device = key_lens.device
        self.cu_seqlens_k = torch.zeros(key_lens.shape[0] + 1, dtype=torch.int32, device=device)
        torch.cumsum(key_lens, 0, out=self.cu_seqlens_k[1:])
        seq = torch.repeat_interleave(torch.arange(key_lens.shape[0], device=device), key_lens,
                                      output_size=attn.num_prefill_keys)
        position = torch.arange(attn.num_prefill_keys, device=device) - self.cu_seqlens_k[seq]
        pages = attn.block_tables[seq, position // attn.page_size].long()
        self.slots = pages * attn.page_size + position % attn.page_size

    def gather(self, cache: torch.Tensor) -> torch.Tensor:
        """[num_prefill_keys, kv_heads, head_dim] rows of one layer's cache."""
        return cache.flatten(0, 1).index_select(0, self.slots)


def _split_single_token_tail(chunks: List[ChunkSpan]) -> Tuple[List[ChunkSpan], List[ChunkSpan]]:
    """(leading chunks, the single-token chunks after them). A single token
    attending to its cached prefix and itself is a decode, whatever its
    request's phase, so the decode kernel computes exactly what the prefill
    kernel would."""
    first = len(chunks)
    while first > 0 and chunks[first - 1][1] == 1:
        first -= 1
    if first == 0:  # no prefill chunk to split from: the prefill kernel takes them all
        return list(chunks), []
    return list(chunks[:first]), list(chunks[first:])


class PagedAttention(nn.Module):
    """Causal attention of the step's tokens over one layer's paged KV cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: Tuple[torch.Tensor, torch.Tensor], attn: AttentionMetadata,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query [T, num_heads * head_dim], key/value [T, num_kv_heads * head_dim]
        (views of a fused projection are fine); returns [T, num_heads * head_dim],
        written into `out` (contiguous, that shape) when given."""
        num_tokens = query.shape[0]
        # A view: both kernels take the query's token and head strides, so the
        # fused projection's slice is read in place (no copy kernel per layer).
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        if out is not None:
            out = out.view(num_tokens, self.num_heads, self.head_dim)
        key_cache, value_cache = kv_cache
        ops.reshape_and_cache(key, value, key_cache, value_cache, attn.slot_mapping)
        if attn.is_decode:
            out = ops.paged_attention_decode(query, key_cache, value_cache, attn.block_tables,
                                             attn.seq_lens, self.scale, out=out)
        elif attn.num_prefill_tokens is None:
            out = self._prefill(query, key, value, kv_cache, attn, out=out)
        else:
            out = self._prefill_then_decodes(query, key, value, kv_cache, attn, out=out)
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def _prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 kv_cache: Tuple[torch.Tensor, torch.Tensor], attn: AttentionMetadata,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Causal attention of the prefill rows, by FlashAttention where torch
        has it: whole fresh prompts over their own key rows, prompts with a
        cached prefix over their keys gathered from the cache (bottom-right
        causal alignment); else pyvlm's paged prefill kernel."""
        if takes_torch_flash(query, key, value):
            if attn.fresh_prefill:
                flash = causal_attention(query, key, value, attn.cu_seqlens_q, attn.cu_seqlens_q,
                                         attn.max_seqlen_q, attn.max_seqlen_q, self.scale)
            else:
                keys = attn.prefill_keys()
                flash = causal_attention(query, keys.gather(kv_cache[0]), keys.gather(kv_cache[1]),
                                         attn.cu_seqlens_q, keys.cu_seqlens_k, attn.max_seqlen_q,
                                         attn.max_seqlen_k, self.scale)
            return flash if out is None else out.copy_(flash)
        key_cache, value_cache = kv_cache
        return ops.paged_attention_prefill(query, key_cache, value_cache, attn.block_tables,
                                           attn.cu_seqlens_q, attn.prefix_lens,
                                           attn.max_seqlen_q, self.scale, out=out)

    def _prefill_then_decodes(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              kv_cache: Tuple[torch.Tensor, torch.Tensor],
                              attn: AttentionMetadata,
                              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A mixed step: prefill attention over the first num_prefill_tokens
        rows, the decode kernel over the single tokens after them."""
        split = attn.num_prefill_tokens
        out = query.new_empty(query.shape) if out is None else out
        self._prefill(query[:split], key[:split], value[:split], kv_cache, attn, out=out[:split])
        key_cache, value_cache = kv_cache
        ops.paged_attention_decode(query[split:], key_cache, value_cache,
                                   attn.decode_block_tables, attn.decode_seq_lens, self.scale,
                                   out=out[split:])
        return out
