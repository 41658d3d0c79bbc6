"""Vision-tower batching with an LRU cache of encoder outputs keyed by the
image's content hash: the images of one step that miss the cache go through
the tower in one batched call; a hit skips the tower.

On CUDA the tower may run on a side stream (--vision-side-stream). With
overlap scheduling a step that starts images is launched while the step
before it still runs; on the step's stream its tower would queue behind
that step, on a side stream it starts at once, beside it. The tower reads
nothing the steps write (its pixels come from the host, its weights do not
change), so only the step that merges its rows waits for it.

Images encoded ahead (ForwardBatch.encode_ahead, pyvlm/scheduling/
encode_ahead.py) are a later step's: on the side stream nothing of this
step waits for them; an event recorded after their tower call is what
the step that reads them waits for.
"""

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

import torch

from pyvlm.runner.deferred_images import PrepareFn, prepare_deferred
from pyvlm.runner.image_shares import ImageShares
from pyvlm.scheduling.types import MultimodalItem

# (items missing from the cache) -> their packed embeddings, in order
EncodeFn = Callable[[Sequence[MultimodalItem]], List[torch.Tensor]]


class EncoderCache:
    """LRU map image hash -> packed embeddings [num_tokens, hidden], holding
    at most max_bytes of embeddings (an entry larger than that is not kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, max_bytes)
        self.num_bytes = 0
        self._entries: "OrderedDict[int, torch.Tensor]" = OrderedDict()
        self.num_hits = 0
        self.num_misses = 0

    def get(self, key: int) -> Optional[torch.Tensor]:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: int, value: torch.Tensor) -> None:
        size = _num_bytes(value)
        if size > self.max_bytes:
            return
        self._drop(key)
        self._entries[key] = value
        self.num_bytes += size
        while self.num_bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self.num_bytes = 0

    def _drop(self, key: int) -> None:
        value = self._entries.pop(key, None)
        if value is not None:
            self.num_bytes -= _num_bytes(value)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: int) -> bool:
        """Whether key is cached (a look: the LRU order is left as it is)."""
        return key in self._entries


def _num_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class VisionBatcher:
    """Embeds the images of a step: cache hits are reused, misses are encoded
    together by encode_fn (one preprocessing call, one tower call).
    rows_of(item): the rows encode_fn must give for an item (default: its
    placeholder span; cross-attention families give their tower rows)."""

    def __init__(self, encode_fn: EncodeFn, cache: EncoderCache,
                 rows_of: Optional[Callable[[MultimodalItem], int]] = None,
                 prepare: Optional[PrepareFn] = None, device: Optional[torch.device] = None,
                 shares: Optional[ImageShares] = None,
                 side_stream: Optional["torch.cuda.Stream"] = None):
        """prepare/device: the family's prepare_images and where it runs for
        items whose images the front left to the step (DeferredImage);
        shares: the tensor-parallel ranks' split of the misses (each rank
        encodes its share, pyvlm.runner.image_shares); None: this process
        encodes them all. side_stream: a torch.cuda.Stream the tower runs
        on (module docstring); None: the caller's stream."""
        self.encode_fn, self.cache = encode_fn, cache
        self.rows_of = rows_of or (lambda item: item.length)
        self.prepare, self.device = prepare, device
        self.shares = shares
        self.side_stream = side_stream
        # image hash -> the side-stream event after which its rows (encoded
        # ahead, not yet read by a step) are complete
        self._ready: Dict[int, "torch.cuda.Event"] = {}
        self.num_encoded_ahead = 0

    def embed(self, items: Sequence[MultimodalItem]) -> Dict[int, torch.Tensor]:
        found: Dict[int, torch.Tensor] = {}
        missing: Dict[int, MultimodalItem] = {}
        for item in items:
            cached = self.cache.get(item.hash)
            if cached is not None:
                found[item.hash] = self._once_ready(item.hash, cached)
            else:
                missing.setdefault(item.hash, item)
        self.cache.num_hits += len(found)
        self.cache.num_misses += len(missing)
        if missing:
            found.update(self._encode(list(missing.values())))
        return found

    def encode_ahead(self, items: Sequence[MultimodalItem]) -> None:
        """Encodes the items missing from the cache into it, for a later
        step (module docstring): on the side stream without making this
        step's stream wait, else as a step's own images."""
        missing = list({item.hash: item for item in items if item.hash not in self.cache}.values())
        if not missing:
            return
        self.num_encoded_ahead += len(missing)
        if self.side_stream is None or self.shares is not None:
            self._encode(missing)
            return
        with torch.cuda.stream(self.side_stream):
            embeddings = self._encode_here(missing)
        ready = torch.cuda.Event()
        ready.record(self.side_stream)
        self._ready = {key: event for key, event in self._ready.items() if key in self.cache}
        for item, emb in zip(missing, embeddings):
            self.cache.put(item.hash, emb)
            self._ready[item.hash] = ready

    @property
    def encodes_beside_steps(self) -> bool:
        """Whether encode_ahead runs the tower on the side stream, beside
        the steps, rather than in the step that carries it."""
        return self.side_stream is not None and self.shares is None

    def is_ready(self, items: Sequence[MultimodalItem]) -> bool:
        """Whether every item encoded ahead on the side stream is complete
        there (Event.query: no wait). Items not encoded ahead, or no longer
        cached, count as ready: the step that reads them encodes them."""
        for item in items:
            ready = self._ready.get(item.hash)
            if ready is not None and item.hash in self.cache and not ready.query():
                return False
        return True

    def _once_ready(self, key: int, rows: torch.Tensor) -> torch.Tensor:
        """rows, with the step's stream made to wait for the side stream's
        tower call that encoded them ahead, and owning them from here on."""
        ready = self._ready.pop(key, None)
        if ready is not None:
            step_stream = torch.cuda.current_stream(self.side_stream.device)
            step_stream.wait_event(ready)
            rows.record_stream(step_stream)
        return rows

    def _encode(self, items: List[MultimodalItem]) -> Dict[int, torch.Tensor]:
        if self.shares is None:
            embeddings = self._on_side_stream(self._encode_here, items)
        else:
            embeddings = self.shares.encode(items, self._encode_here)
        for item, emb in zip(items, embeddings):
            self.cache.put(item.hash, emb)
        return {item.hash: emb for item, emb in zip(items, embeddings)}

    def _on_side_stream(self, encode: EncodeFn,
                        items: Sequence[MultimodalItem]) -> List[torch.Tensor]:
        """encode(items) on the side stream, if any; the caller's stream then
        waits for it before its next work, and owns the rows it reads (the
        allocator reuses their memory only once that stream is past them)."""
        if self.side_stream is None:
            return encode(items)
        step_stream = torch.cuda.current_stream(self.side_stream.device)
        with torch.cuda.stream(self.side_stream):
            embeddings = encode(items)
        step_stream.wait_stream(self.side_stream)
        for emb in embeddings:
            emb.record_stream(step_stream)
        return embeddings

    def _encode_here(self, items: Sequence[MultimodalItem]) -> List[torch.Tensor]:
        """items' rows from this process's tower (deferred images prepared
        first); RuntimeError if the tower gave an item other than its rows."""
        if self.prepare is not None:
            items = prepare_deferred(items, self.prepare, self.device)
        embeddings = self.encode_fn(items)
        for item, emb in zip(items, embeddings):
            if emb.shape[0] != self.rows_of(item):
                raise RuntimeError(f"image encoder gave {emb.shape[0]} rows for an image "
                                   f"that needs {self.rows_of(item)}")
        return embeddings
