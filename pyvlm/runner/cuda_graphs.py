"""CUDA graphs of the decode step (SGLang's CudaGraphRunner, vLLM's
cudagraph capture): the decoder forward and the LM head of a decode batch,
captured once per padded batch size at start-up and replayed each step, so
a step costs a few copies and one graph launch instead of hundreds of
kernel launches from Python.

A batch of n sequences runs in the graph of the smallest captured size
>= n. The padding rows write no KV (slot -1, which reshape_and_cache skips)
and attend to one cached token (page 0, whatever it holds): their outputs
are discarded. Block tables are captured at the context's full width, so
one graph serves every context length; the decode kernel reads only the
pages a sequence's length covers and sizes its context splits on the
device.

A cross-attention family adds its static image inputs (`cross`:
the object its graph_cross_attention_inputs returns, with inputs(size),
reset_padding(size), can_run(chunks) and stage(chunks, size, upload)):
each decode token reads at most one stored image through the paged decode
kernel; batches that need more run eagerly.

`emulate=True` runs the same static buffers eagerly instead of a graph
(CPU tests check the padding and buffer logic with it; it is never faster).
"""

import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from pyvlm import ops
from pyvlm.layers.attention import AttentionMetadata, padded_block_tables, slots_of
from pyvlm.layers.rotary import MRotaryEmbedding
from pyvlm.ops.host_upload import HostUpload
from pyvlm.scheduling.types import SequenceChunk

logger = logging.getLogger("pyvlm.runner")

PAD_SLOT = -1  # reshape_and_cache skips negative slots


def graph_batch_sizes(max_bs: int) -> List[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every 8 to 64, every 16 beyond
    (SGLang's spacing: little padding where batches are small), up to max_bs."""
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, max(max_bs, 1) + 16, 16))
    sizes = [s for s in sizes if s < max_bs] + [max_bs]
    return sorted(set(s for s in sizes if s >= 1))


def position_rows_of(model: torch.nn.Module) -> int:
    """Rows of rotary positions the model takes: M-RoPE's sections, else 1."""
    for module in model.modules():
        if isinstance(module, MRotaryEmbedding):
            return len(module.mrope_section)
    return 1


class DecodeGraphs:
    """Captured decode steps of `model` over `kv_caches`, one per size of
    graph_batch_sizes(max_bs), for sequences of up to max_pages pages."""

    def __init__(self, model: torch.nn.Module, kv_caches, page_size: int, max_bs: int,
                 max_pages: int, device: torch.device, emulate: bool = False,
                 cross: Optional[Any] = None):
        self.model, self.kv_caches, self.page_size = model, kv_caches, page_size
        self.device, self.emulate, self.cross = device, emulate, cross
        self.sizes = graph_batch_sizes(max_bs)
        self.max_bs, self.max_pages = self.sizes[-1], max(1, max_pages)
        self.num_rows = position_rows_of(model)
        make = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.input_ids = make(self.max_bs, dtype=torch.int64)
        self.positions = make(self.num_rows * self.max_bs, dtype=torch.int64)
        self.slot_mapping = make(self.max_bs, dtype=torch.int64)
        self.seq_lens = make(self.max_bs, dtype=torch.int32)
        self.block_tables = make(self.max_bs, self.max_pages, dtype=torch.int32)
        self._graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: Dict[int, torch.Tensor] = {}

    # ---- capture ---------------------------------------------------------

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every size, largest first (smaller graphs then reuse
        the memory pool the largest one sized)."""
        started = time.monotonic()
        self._reset_padding(self.max_bs)
        pool = None if self.emulate else torch.cuda.graph_pool_handle()
        with ops.index_checks(False):  # a check is a host sync: not capturable
            for size in reversed(self.sizes):
                self._capture_one(size, pool)
        if not self.emulate:
            torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s in %.1f s",
                    self.sizes if len(self.sizes) < 12 else f"1..{self.max_bs} ({len(self.sizes)})",
                    time.monotonic() - started)

    def _capture_one(self, size: int, pool) -> None:
        if self.emulate:
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy caches and kernel plans outside the graph
                self._run_static(size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            self._logits[size] = self._run_static(size)
        self._graphs[size] = graph

    def _run_static(self, size: int) -> torch.Tensor:
        """The decode step over the first `size` rows of the static buffers."""
        positions = self.positions[:self.num_rows * size]
        positions = positions if self.num_rows == 1 else positions.view(self.num_rows, size)
        attn = AttentionMetadata(is_decode=True, slot_mapping=self.slot_mapping[:size],
                                 block_tables=self.block_tables[:size],
                                 seq_lens=self.seq_lens[:size])
        if self.cross is not None:
            attn.cross_attention = self.cross.inputs(size)
        hidden = self.model.forward(self.input_ids[:size], positions, attn, self.kv_caches, None)
        return self.model.compute_logits(hidden).float()

    def _reset_padding(self, size: int) -> None:
        self.input_ids[:size].zero_()
        self.positions.zero_()
        self.slot_mapping[:size].fill_(PAD_SLOT)
        self.seq_lens[:size].fill_(1)
        self.block_tables[:size].zero_()
        if self.cross is not None:
            self.cross.reset_padding(size)

    # ---- replay ----------------------------------------------------------

    def can_run(self, chunks: Sequence[SequenceChunk]) -> bool:
        """Whether a decode batch fits the captured shapes."""
        return (0 < len(chunks) <= self.max_bs
                and all(len(c.page_table) <= self.max_pages for c in chunks)
                and all(len(c.positions) == self.num_rows for c in chunks)
                and (self.cross is None or self.cross.can_run(chunks)))

    def stage(self, chunks: Sequence[SequenceChunk],
              upload: HostUpload) -> Callable[[], torch.Tensor]:
        """Adds the batch's padded inputs to `upload`; the returned callable
        (after upload.to(); given what patches future tokens into the input
        ids) fills the static buffers, replays the graph and returns the
        float32 logits [len(chunks), vocab] (valid until the next replay)."""
        n = len(chunks)
        size = next(s for s in self.sizes if s >= n)
        pad = size - n
        last = [c.start_pos for c in chunks]
        ids = upload.add([max(c.token_ids[0], 0) for c in chunks] + [0] * pad, torch.int64)
        rows = [[c.positions[r][0] for c in chunks] + [0] * pad for r in range(self.num_rows)]
        positions = upload.add(rows, torch.int64)
        slots = upload.add([slots_of(p, 1, c.page_table, self.page_size)[0]
                            for c, p in zip(chunks, last)] + [PAD_SLOT] * pad, torch.int64)
        seq_lens = upload.add([p + 1 for p in last] + [1] * pad, torch.int32)
        rows_of_pages = padded_block_tables([c.page_table for c in chunks])
        width = len(rows_of_pages[0])
        tables = upload.add(rows_of_pages, torch.int32)
        fill_cross = self.cross.stage(chunks, size, upload) if self.cross is not None else None

        def replay(patch_ids: Callable[[torch.Tensor], None] = lambda ids: None) -> torch.Tensor:
            self.input_ids[:size].copy_(ids.tensor)
            patch_ids(self.input_ids[:size])
            self.positions[:self.num_rows * size].copy_(positions.tensor.view(-1))
            self.slot_mapping[:size].copy_(slots.tensor)
            self.seq_lens[:size].copy_(seq_lens.tensor)
            self.block_tables[:n, :width].copy_(tables.tensor)
            if fill_cross is not None:
                fill_cross()
            if self.emulate:
                with torch.inference_mode():
                    return self._run_static(size)[:n]
            self._graphs[size].replay()
            return self._logits[size][:n]

        return replay
