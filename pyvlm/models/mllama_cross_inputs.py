"""One step's cross-attention inputs of Llama-3.2-Vision (mllama): which
image rows each token attends to, and which images' K/V this step writes.

The image K/V live in the KV pool (pyvlm.runner.kv_pool: an image's pages
are blocks of a cross-attention layer's cache view). Each token of the step
is one of:
- no images in its request: it attends to nothing (output zero) and its MLP
  is masked: the layer is skipped, as transformers skips it for prompts
  without images;
- before the request's first image token: transformers clears its mask row,
  so it attends to every row of every image of the request, padding tiles
  included, and only its MLP is masked. Those rows are not stored (only
  real tiles are): they come from the step's tower output ("states");
- otherwise: it attends to the real rows of the images covering its
  position (MultimodalItem.cross_span; generated tokens as the prompt's
  last token), read from the pool: through the paged decode kernel when
  one image covers it in a decode step, else gathered into a packed key
  list for varlen attention (runs of several images; prefill, where
  varlen tiles the queries; on CUDA FlashAttention, a few queries' keys
  split in chunks so that more than one block per head walks them).
Images the scheduler marks needs_write are encoded this step and their real
rows written into their pages by every cross-attention layer before it
attends.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from pyvlm.layers.packed_attention import packed_attention, takes_torch_flash
from pyvlm.layers.split_key_attention import (KeySplits, key_split_count, packed_split_lists,
                                              split_key_attention)
from pyvlm.ops.host_upload import HostUpload
from pyvlm.scheduling.types import CrossImage, MultimodalItem, SequenceChunk

# items -> {hash: the image's full tower rows [max_tiles * patches, hidden]}
EncodeFn = Callable[[Sequence[MultimodalItem]], Dict[int, torch.Tensor]]


@dataclass
class PagedCrossAttention:
    """Tokens attending to one stored image: decode-kernel inputs."""

    tokens: torch.Tensor  # int64 [n]: rows of the step's tokens
    block_tables: torch.Tensor  # int32 [n, max_blocks] in the cross-layer cache view
    seq_lens: torch.Tensor  # int32 [n]: the image's rows
    # tokens is every row of the step in order (0..n-1): the kernel's output
    # is the layer's whole attention output, with no scatter into zeros
    every_token: bool = False


@dataclass
class GatheredCrossAttention:
    """Tokens attending to packed key lists (varlen attention): groups of
    consecutive tokens sharing their images; each group's keys come from
    the pool (cache_slots) or from this step's image rows (state_rows)."""

    tokens: torch.Tensor  # int64 [m], group after group
    cu_seqlens_q: torch.Tensor  # int32 [groups + 1]
    cu_seqlens_k: torch.Tensor  # int32 [groups + 1]
    max_seqlen_q: int
    max_seqlen_k: int
    cache_positions: torch.Tensor  # int64: key rows read from the pool ...
    cache_slots: torch.Tensor  # int64: ... at these slots of the cache view
    state_positions: torch.Tensor  # int64: key rows taken from image_states ...
    state_rows: torch.Tensor  # int64: ... rows
    # the groups' keys cut in chunks, where that pays (a prompt's few dozen
    # tokens after an image over its 6,404 rows: pyvlm/layers/split_key_attention.py)
    splits: Optional[KeySplits] = None

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Each group's queries [m, heads, head_dim] over its packed keys and
        values (keys()): split along the keys where FlashAttention runs it
        and the plan has splits, else one varlen attention."""
        if self.splits is not None and takes_torch_flash(query, key, value):
            return split_key_attention(query, key, value, self.splits, scale)
        return packed_attention(query, key, value, self.cu_seqlens_q, self.cu_seqlens_k,
                                self.max_seqlen_q, self.max_seqlen_k, scale)

    def keys(self, cache: torch.Tensor, state_rows: Optional[torch.Tensor]) -> torch.Tensor:
        """The packed keys (or values) [total_k, kv_heads, head_dim]."""
        rows = cache.shape[-2:]
        total = int(self.cache_positions.numel() + self.state_positions.numel())
        out = torch.empty((total, *rows), dtype=cache.dtype, device=cache.device)
        if self.cache_positions.numel():
            flat = cache.view(-1, *rows)
            out.index_copy_(0, self.cache_positions, flat.index_select(0, self.cache_slots))
        if self.state_positions.numel():
            out.index_copy_(0, self.state_positions, state_rows.index_select(0, self.state_rows))
        return out


@dataclass
class CrossAttentionInputs:
    """Everything the cross-attention layers need in one step."""

    num_tokens: int
    mlp_kept: torch.Tensor  # [T] 1.0 where the token attends to real images, else 0.0
    image_states: Optional[torch.Tensor] = None  # [R, hidden] tower rows of this step's images
    write_rows: Optional[torch.Tensor] = None  # int64: rows of image_states to store ...
    write_slots: Optional[torch.Tensor] = None  # int64: ... at these cache-view slots
    paged: Optional[PagedCrossAttention] = None
    gathered: Optional[GatheredCrossAttention] = None


class _Plan:
    """Plain lists, filled token by token, then turned into tensors."""

    def __init__(self):
        self.mlp_kept: List[float] = []
        self.paged_tokens: List[int] = []
        self.paged_blocks: List[List[int]] = []
        self.paged_lens: List[int] = []
        self.groups: List[Tuple[list, list]] = []  # (token rows, key sources)


def _image_slots(pool, image: CrossImage) -> torch.Tensor:
    """Cache-view slots of the image's rows, in row order (CPU int64: an
    image has thousands of rows, too many to list number by number)."""
    size = pool.page_size
    blocks = torch.tensor(pool.image_blocks(image.pages), dtype=torch.int64)
    rows = torch.arange(image.item.num_cross_rows)
    return blocks[rows // size] * size + rows % size


def _ranges(starts_and_lengths) -> torch.Tensor:
    """The rows start .. start + length - 1 of each pair, one after another."""
    return _joined([torch.arange(start, start + length) for start, length in starts_and_lengths])


def _joined(tensors: List[torch.Tensor]) -> torch.Tensor:
    """The int64 tensors one after another (empty for none)."""
    return torch.cat(tensors) if tensors else torch.zeros(0, dtype=torch.int64)


def _attended(images: Sequence[CrossImage], position: int) -> Tuple[int, ...]:
    return tuple(i for i, image in enumerate(images) if image.item.is_attended_at(position))


def _token_classes(chunk: SequenceChunk):
    """Per new token: None (no images), "pre" (before the first image
    token) or the indices of the images it attends to."""
    images = chunk.cross_images
    last_prompt = len(chunk.prompt_ids) - 1
    first = min(image.item.cross_span[0] for image in images) if images else 0
    classes = []
    for position in range(chunk.start_pos, chunk.start_pos + chunk.num_new_tokens):
        position = min(position, last_prompt)
        if not images:
            classes.append(None)
        elif position < first:
            classes.append("pre")
        else:
            classes.append(_attended(images, position))
    return classes


def _needs_states(chunk: SequenceChunk, classes) -> List[MultimodalItem]:
    """Images of the chunk whose tower rows this step needs."""
    if "pre" in classes:
        return [image.item for image in chunk.cross_images]
    return [image.item for image in chunk.cross_images if image.needs_write]


def build_cross_attention_inputs(chunks: Sequence[SequenceChunk], pool, encode: EncodeFn,
                                 is_decode: bool, device, dtype,
                                 rows_of: Callable[[MultimodalItem], int]
                                 ) -> CrossAttentionInputs:
    """The step's inputs (module docstring). rows_of(item): an image's rows
    in its tower output (every tile, padding tiles included)."""
    classes = [_token_classes(chunk) for chunk in chunks]
    wanted: Dict[int, MultimodalItem] = {}
    for chunk, chunk_classes in zip(chunks, classes):
        for item in _needs_states(chunk, chunk_classes):
            wanted.setdefault(item.hash, item)
    states = encode(list(wanted.values())) if wanted else {}
    offsets, total = {}, 0
    for key in wanted:
        offsets[key], total = total, total + rows_of(wanted[key])
    plan, base = _Plan(), 0
    for chunk, chunk_classes in zip(chunks, classes):
        _plan_chunk(plan, chunk, chunk_classes, base, pool, offsets, rows_of, is_decode)
        base += chunk.num_new_tokens
    # Every index list of the step reaches the device in one asynchronous
    # copy per dtype (a pageable copy would wait for the step in flight).
    staged = HostUpload()
    mlp_kept = staged.add(plan.mlp_kept, dtype)
    writes = _writes(chunks, pool, offsets, staged) if wanted else lambda: (None, None)
    paged, gathered = _paged(plan, staged), _gathered(plan, staged)
    staged.to(device)
    inputs = CrossAttentionInputs(base, mlp_kept.tensor)
    if wanted:
        inputs.image_states = torch.cat([states[key] for key in wanted]).to(dtype)
    inputs.write_rows, inputs.write_slots = writes()
    inputs.paged, inputs.gathered = paged(), gathered()
    return inputs


def _plan_chunk(plan: _Plan, chunk: SequenceChunk, classes, base: int, pool, offsets,
                rows_of, is_decode: bool) -> None:
    images = chunk.cross_images
    previous = object()
    for index, cls in enumerate(classes):
        plan.mlp_kept.append(0.0 if cls is None or cls == "pre" else 1.0)
        if cls is None:
            continue
        if (is_decode or chunk.is_generated_token) and len(cls) == 1:
            image = images[cls[0]]
            plan.paged_tokens.append(base + index)
            plan.paged_blocks.append(pool.image_blocks(image.pages))
            plan.paged_lens.append(image.item.num_cross_rows)
            continue
        if cls != previous:
            plan.groups.append(([], _key_sources(images, cls, pool, offsets, rows_of)))
        plan.groups[-1][0].append(base + index)
        previous = cls


def _key_sources(images: Sequence[CrossImage], cls, pool, offsets, rows_of):
    """("state", rows) for every row of every image (a "pre" token), or
    ("cache", slots) of the attended images' stored rows."""
    if cls == "pre":
        return ("state", _ranges((offsets[image.item.hash], rows_of(image.item))
                                 for image in images))
    return ("cache", _joined([_image_slots(pool, images[i]) for i in cls]))


def _writes(chunks, pool, offsets, staged: HostUpload):
    """Stages the (rows of image_states, cache-view slots) of the images to
    store; returns what gives them once staged.to() has run."""
    spans, slots, done = [], [], set()
    for chunk in chunks:
        for image in chunk.cross_images:
            key = image.item.hash
            if not image.needs_write or key in done:
                continue
            done.add(key)
            spans.append((offsets[key], image.item.num_cross_rows))
            slots.append(_image_slots(pool, image))
    if not spans:
        return lambda: (None, None)
    pending = staged.add(_ranges(spans), torch.int64), staged.add(torch.cat(slots), torch.int64)
    return lambda: tuple(p.tensor for p in pending)


def _paged(plan: _Plan, staged: HostUpload) -> Callable[[], Optional[PagedCrossAttention]]:
    if not plan.paged_tokens:
        return lambda: None
    width = max(len(blocks) for blocks in plan.paged_blocks)
    table = [blocks + [0] * (width - len(blocks)) for blocks in plan.paged_blocks]
    pending = (staged.add(plan.paged_tokens, torch.int64), staged.add(table, torch.int32),
               staged.add(plan.paged_lens, torch.int32))
    every_token = plan.paged_tokens == list(range(len(plan.mlp_kept)))
    return lambda: PagedCrossAttention(*(p.tensor for p in pending), every_token=every_token)


def _gathered(plan: _Plan, staged: HostUpload) -> Callable[[], Optional[GatheredCrossAttention]]:
    if not plan.groups:
        return lambda: None
    tokens, cu_q, cu_k = [], [0], [0]
    # per source: (start, length) of its key positions, and its index tensors
    spans: Dict[str, list] = {"cache": [], "state": []}
    indices_of: Dict[str, list] = {"cache": [], "state": []}
    for group_tokens, (source, indices) in plan.groups:
        tokens.extend(group_tokens)
        start = cu_k[-1]
        spans[source].append((start, len(indices)))
        indices_of[source].append(indices)
        cu_q.append(cu_q[-1] + len(group_tokens))
        cu_k.append(start + len(indices))
    by_source = [(_ranges(spans[source]), _joined(indices_of[source]))
                 for source in ("cache", "state")]
    longs = [staged.add(v, torch.int64) for v in (tokens, *by_source[0], *by_source[1])]
    ints = [staged.add(v, torch.int32) for v in (cu_q, cu_k)]
    max_q = max(len(t) for t, _ in plan.groups)
    max_k = max(len(i) for _, (_, i) in plan.groups)
    splits = _key_splits(plan, staged)

    def make() -> GatheredCrossAttention:
        tokens_t, *positions = (p.tensor for p in longs)
        return GatheredCrossAttention(tokens_t, ints[0].tensor, ints[1].tensor, max_q, max_k,
                                      *positions, splits=splits())

    return make


def _key_splits(plan: _Plan, staged: HostUpload) -> Callable[[], Optional[KeySplits]]:
    """Stages the groups' split plan over their packed keys, where one pays."""
    query_lengths = [len(t) for t, _ in plan.groups]
    key_lengths = [len(i) for _, (_, i) in plan.groups]
    num_splits = key_split_count(query_lengths, key_lengths)
    if num_splits == 1:
        return lambda: None
    rows, cu_q, cu_k = packed_split_lists(query_lengths, key_lengths, num_splits)
    pending = (staged.add(rows, torch.int64), staged.add(cu_q, torch.int32),
               staged.add(cu_k, torch.int32))
    max_q = max(query_lengths)
    max_k = max(end - begin for begin, end in zip(cu_k, cu_k[1:]))
    return lambda: KeySplits(num_splits, *(p.tensor for p in pending), max_q, max_k)


class GraphCrossInputs:
    """Cross-attention inputs of captured decode graphs: static buffers for
    up to max_bs decode tokens, each reading at most one stored image
    through the paged decode kernel (tokens of text-only requests and the
    graph's padding rows read none: zero rows, output zero, MLP kept 0).

    A token of a text-only request then computes what skipping the layer
    computes (the residual sum, plus exact zeros), so one graph serves
    batches with and without images. Batches whose tokens need the eager
    path (an image to encode and write, several images attended at once:
    varlen over gathered keys) do not fit (can_run False).
    """

    def __init__(self, max_bs: int, max_blocks: int, pool, dtype, device):
        self.pool, self.max_blocks = pool, max_blocks
        make = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.mlp_kept = make(max_bs, dtype=dtype)
        self.tokens = torch.arange(max_bs, dtype=torch.int64, device=device)
        self.block_tables = make(max_bs, max(1, max_blocks), dtype=torch.int32)
        self.seq_lens = make(max_bs, dtype=torch.int32)
        self._last = None  # (chunks, rows): can_run's answer, reused by stage

    def inputs(self, size: int) -> CrossAttentionInputs:
        """The captured step's inputs over the first `size` rows."""
        paged = PagedCrossAttention(self.tokens[:size], self.block_tables[:size],
                                    self.seq_lens[:size], every_token=True)
        return CrossAttentionInputs(size, self.mlp_kept[:size], paged=paged)

    def reset_padding(self, size: int) -> None:
        self.mlp_kept[:size].zero_()
        self.seq_lens[:size].zero_()
        self.block_tables[:size].zero_()

    def rows(self, chunks: Sequence[SequenceChunk]
             ) -> Optional[Tuple[List[float], List[List[int]], List[int]]]:
        """Per decode token (mlp kept, image blocks, image rows), or None
        when the batch does not fit the captured inputs."""
        kept, blocks, lens = [], [], []
        for chunk in chunks:
            if any(image.needs_write for image in chunk.cross_images):
                return None
            (cls,) = _token_classes(chunk)
            if cls is None or cls == ():  # no images / none attended here: nothing to read
                kept.append(0.0 if cls is None else 1.0)
                blocks.append([0])
                lens.append(0)
                continue
            if cls == "pre" or len(cls) != 1:
                return None
            image = chunk.cross_images[cls[0]]
            image_blocks = self.pool.image_blocks(image.pages)
            if len(image_blocks) > self.max_blocks:
                return None
            kept.append(1.0)
            blocks.append(image_blocks)
            lens.append(image.item.num_cross_rows)
        return kept, blocks, lens

    def can_run(self, chunks: Sequence[SequenceChunk]) -> bool:
        if not all(c.num_new_tokens == 1 for c in chunks):
            return False
        self._last = (chunks, self.rows(chunks))
        return self._last[1] is not None

    def _rows_of(self, chunks: Sequence[SequenceChunk]):
        """rows(chunks), from can_run's call on the same batch when it made one."""
        if self._last is not None and self._last[0] is chunks:
            return self._last[1]
        return self.rows(chunks)

    def stage(self, chunks: Sequence[SequenceChunk], size: int, upload) -> Callable[[], None]:
        """Adds the batch's padded rows to `upload` (a pyvlm.ops.host_upload
        HostUpload); the callable (after upload.to()) fills the buffers."""
        kept, blocks, lens = self._rows_of(chunks)
        self._last = None
        pad = size - len(chunks)
        width = max(len(b) for b in blocks)
        kept_rows = upload.add(kept + [0.0] * pad, torch.float32)
        len_rows = upload.add(lens + [0] * pad, torch.int32)
        table = upload.add([b + [0] * (width - len(b)) for b in blocks], torch.int32)
        n = len(chunks)

        def fill() -> None:
            self.mlp_kept[:size].copy_(kept_rows.tensor)
            self.seq_lens[:size].copy_(len_rows.tensor)
            self.block_tables[:n, :width].copy_(table.tensor)

        return fill
