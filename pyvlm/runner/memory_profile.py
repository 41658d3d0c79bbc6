"""What a step needs on the GPU beside the weights and the KV pool,
measured before the pool is sized (SGLang's and vLLM's profile run), so the
pool, the activations, the CUDA graphs and the encoder cache all fit in
--mem-fraction-static of the card:

- the peak activations of the largest prefill step (max_prefill_tokens new
  tokens, as sequences of at most the context length), run once over a
  scratch pool;
- the activations a decode step of the largest captured batch keeps in the
  graphs' memory pool for good;
- likewise for the piecewise prefill graphs: at most the activations of an
  eager forward of their largest token count (a piece holds one layer's
  share of them), plus their static hand-off buffers;
- the encoder cache's byte budget.

The vision tower is not run: its inputs are a family's own; its rows count
against the same prefill token budget, and its activations are freed
before the decoder's prefill of them starts. On a side stream
(--vision-side-stream) the allocator keeps its freed memory for that
stream, so the largest prefill's activations are reserved once more for
it (a bound: a tower row's activations are narrower than a decoder row's).
"""

import logging
from dataclasses import dataclass

import torch

from pyvlm.layers.attention import AttentionMetadata
from pyvlm.runner.cuda_graphs import position_rows_of
from pyvlm.runner.kv_pool import KVPool, KVShape

logger = logging.getLogger("pyvlm.runner")

GIB = 1 << 30


@dataclass(frozen=True)
class StepMemory:
    prefill_bytes: int
    decode_bytes: int
    encoder_cache_bytes: int
    prefill_graph_bytes: int = 0
    vision_stream_bytes: int = 0  # the tower's activations on its own stream

    @property
    def total(self) -> int:
        return (self.prefill_bytes + self.decode_bytes + self.encoder_cache_bytes
                + self.prefill_graph_bytes + self.vision_stream_bytes)

    def describe(self) -> str:
        side = (f", vision side stream {self.vision_stream_bytes / GIB:.2f}"
                if self.vision_stream_bytes else "")
        return (f"{self.total / GIB:.2f} GiB reserved for steps (prefill activations "
                f"{self.prefill_bytes / GIB:.2f}, decode graphs {self.decode_bytes / GIB:.2f}, "
                f"prefill graphs {self.prefill_graph_bytes / GIB:.2f}, "
                f"encoder cache {self.encoder_cache_bytes / GIB:.2f}{side})")


@torch.inference_mode()
def measure_step_memory(model: torch.nn.Module, shape: KVShape, page_size: int,
                        device: torch.device, num_prefill_tokens: int, max_seq_len: int,
                        max_decode_batch: int, encoder_cache_bytes: int,
                        max_graph_tokens: int = 0,
                        vision_side_stream: bool = False) -> StepMemory:
    """Peak bytes of a prefill of num_prefill_tokens, of a decode of
    max_decode_batch sequences, of the prefill graphs of up to
    max_graph_tokens tokens and, with vision_side_stream, of the tower's
    own stream (0 on the CPU, where nothing is reserved)."""
    if device.type != "cuda":
        return StepMemory(0, 0, 0)
    lengths = _split(num_prefill_tokens, max(max_seq_len, 1))
    prefill = _peak_bytes(model, shape, page_size, device, lengths, is_decode=False)
    decode = (_peak_bytes(model, shape, page_size, device, [1] * max_decode_batch, True)
              if max_decode_batch > 0 else 0)
    graphs = 0
    if max_graph_tokens > 0:
        graphs = _peak_bytes(model, shape, page_size, device,
                             _split(max_graph_tokens, max(max_seq_len, 1)), is_decode=False)
    memory = StepMemory(prefill, decode, encoder_cache_bytes, graphs,
                        prefill if vision_side_stream else 0)
    logger.info("%s", memory.describe())
    return memory


def _split(num_tokens: int, max_len: int):
    lengths = [max_len] * (num_tokens // max_len)
    return lengths + ([num_tokens % max_len] if num_tokens % max_len else [])


def _peak_bytes(model, shape: KVShape, page_size: int, device: torch.device, lengths,
                is_decode: bool) -> int:
    """Allocator peak of one forward (and its sampled rows' logits) over a
    scratch pool holding just its tokens, beyond what was allocated before."""
    tables, first = [], 0
    for length in lengths:
        num_pages = -(-length // page_size)
        tables.append(list(range(first, first + num_pages)))
        first += num_pages
    pool = KVPool(shape, max(first, 1), page_size, device)
    try:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        spans = [(length - 1 if is_decode else 0, 1 if is_decode else length, table)
                 for length, table in zip(lengths, tables)]
        attn = AttentionMetadata.build(spans, page_size, is_decode, device)
        num_tokens = len(lengths) if is_decode else sum(lengths)
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        positions = torch.cat([torch.arange(start, start + n, device=device)
                               for start, n, _ in spans])
        rows = position_rows_of(model)
        if rows > 1:
            positions = positions.expand(rows, -1).contiguous()
        hidden = model.forward(ids, positions, attn, pool.caches, None)
        model.compute_logits(hidden[-len(lengths):]).float()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - before, 0)
    finally:
        del pool
        torch.cuda.empty_cache()
