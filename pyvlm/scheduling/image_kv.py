"""Pages holding images' cross-attention K/V (Llama-3.2-Vision), no torch.

A cross-attention family keeps each image's K/V rows (its real tiles'
patches, every cross-attention layer) in pages of the same pool as the
text KV, so one budget and one `token usage` cover both. An image's pages
are shared by everything that uses the same image (same content hash and
processing): each request that runs with it holds a reference, and so does
each radix-cache node whose page holds the image's token (a prefix-cache hit
on that node then finds the image K/V still there). Pages go back to the
allocator when the last reference goes. Nothing is shared between different
images: the key is the image's hash, which names its pixels and processing.
"""

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

from pyvlm.scheduling.page_allocator import PageAllocator
from pyvlm.scheduling.types import MultimodalItem


@dataclass(eq=False)
class ImageKV:
    """One image's K/V pages. is_written turns True once a step that
    computed them succeeded; until then every chunk using it asks the
    runner to write them (a rerun after a failure writes them again)."""

    key: int
    pages: List[int]
    num_rows: int
    is_written: bool = False
    num_request_refs: int = 0
    num_node_refs: int = 0


@dataclass
class ImageKVTable:
    """Image K/V pages by image hash, reference counted (see the module
    docstring). rows_per_page: image rows one page holds (0: the model
    keeps no image K/V and no item ever asks for pages)."""

    allocator: PageAllocator
    rows_per_page: int
    entries: Dict[int, ImageKV] = field(default_factory=dict)

    def num_pages_for(self, item: MultimodalItem) -> int:
        if item.num_cross_rows <= 0:
            return 0
        if self.rows_per_page <= 0:
            raise ValueError("an image asks for cross-attention K/V, but the model keeps none")
        return -(-item.num_cross_rows // self.rows_per_page)

    def num_missing_pages(self, items: Iterable[MultimodalItem]) -> int:
        """Pages the images not yet in the table would take (each image once)."""
        missing = {item.hash: item for item in items
                   if item.num_cross_rows and item.hash not in self.entries}
        return sum(self.num_pages_for(item) for item in missing.values())

    @property
    def num_pages(self) -> int:
        return sum(len(entry.pages) for entry in self.entries.values())

    @property
    def num_evictable_pages(self) -> int:
        """Pages held only by radix-cache nodes (evicting them frees these)."""
        return sum(len(entry.pages) for entry in self.entries.values()
                   if entry.num_request_refs == 0)

    def acquire(self, item: MultimodalItem) -> Optional[ImageKV]:
        """A request's reference to the item's K/V pages, allocating them
        when the image is new; None (nothing taken) when the pool is short."""
        entry = self.entries.get(item.hash)
        if entry is None:
            pages = self.allocator.alloc(self.num_pages_for(item))
            if pages is None:
                return None
            entry = self.entries[item.hash] = ImageKV(item.hash, pages, item.num_cross_rows)
        entry.num_request_refs += 1
        return entry

    def release(self, entry: ImageKV) -> None:
        """Drops a request's reference."""
        if entry.num_request_refs <= 0:
            raise RuntimeError(f"image K/V {entry.key}: released more often than acquired")
        entry.num_request_refs -= 1
        self._free_if_unused(entry)

    def hold_for_node(self, key: int) -> bool:
        """A radix node's reference, to an image already in the table
        (False: no such image K/V, nothing held)."""
        entry = self.entries.get(key)
        if entry is None:
            return False
        entry.num_node_refs += 1
        return True

    def drop_for_node(self, key: int) -> None:
        entry = self.entries[key]
        if entry.num_node_refs <= 0:
            raise RuntimeError(f"image K/V {key}: a node dropped a reference it did not hold")
        entry.num_node_refs -= 1
        self._free_if_unused(entry)

    def _free_if_unused(self, entry: ImageKV) -> None:
        if entry.num_request_refs == 0 and entry.num_node_refs == 0:
            del self.entries[entry.key]
            self.allocator.free(entry.pages)
