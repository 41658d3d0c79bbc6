"""Page bookkeeping of requests: prefix matching, growth, caching, release.

Ties the page allocator and the radix cache to requests. A request's page
table is [tree-owned pages (locked through request.cache_node)] followed by
[pages only it owns]; these functions keep that split true. Cross-attention
families also hold their images' K/V pages (pyvlm.scheduling.image_kv):
taken at admission, kept alive by the radix nodes of the image tokens,
dropped on release.
"""

from typing import Iterator, List, Optional

from pyvlm.scheduling.image_kv import ImageKVTable
from pyvlm.scheduling.page_allocator import PageAllocator
from pyvlm.scheduling.radix_cache import PageKey, PrefixMatch, RadixCache, RadixNode
from pyvlm.scheduling.request import Request
from pyvlm.scheduling.types import MultimodalItem


class KVManager:
    """The page pool and prefix cache as the scheduler uses them.
    image_rows_per_page: image K/V rows per page (0: no cross-attention)."""

    def __init__(self, num_pages: int, page_size: int, enable_radix_cache: bool = True,
                 image_rows_per_page: int = 0):
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        self.images = ImageKVTable(self.allocator, image_rows_per_page)
        self.cache = RadixCache(page_size, self.allocator, enabled=enable_radix_cache,
                                on_remove=self._drop_node_images)

    @property
    def num_total_pages(self) -> int:
        return self.allocator.num_total

    @property
    def num_used_pages(self) -> int:
        """Pages held by requests (evictable cached pages count as free)."""
        return self.allocator.num_used - self.num_evictable_pages

    @property
    def num_evictable_pages(self) -> int:
        """Cached pages (text and image K/V) no running request holds."""
        return self.cache.num_evictable_pages + self.images.num_evictable_pages

    def num_pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def num_image_pages(self, request: Request) -> int:
        """Pages the request's images' cross-attention K/V take (shared or not)."""
        return sum(self.images.num_pages_for(item) for item in _distinct_images(request))

    def num_unwritten_image_rows(self, request: Request) -> int:
        """K/V rows of the request's images that admitting it would compute
        (images not in the pool yet, or not yet written)."""
        rows = 0
        for item in _distinct_images(request):
            entry = self.images.entries.get(item.hash)
            if item.num_cross_rows and (entry is None or not entry.is_written):
                rows += item.num_cross_rows
        return rows

    def num_missing_image_pages(self, request: Request) -> int:
        """Pages admitting the request would newly allocate for its images."""
        return self.images.num_missing_pages(request.mm_items) if not request.image_kv else 0

    def match(self, request: Request) -> PrefixMatch:
        """The cached prefix a (re)admission can reuse: whole pages, and never
        the whole sequence (the last token must run to produce logits).

        A look only: the LRU order is left as it is (admit touches the
        prefix it takes), so ordering the queue ages nothing. The look is
        kept on the request: while the tree's shape is unchanged it is the
        answer; while its deepest node is still in the tree the walk goes on
        from there (only new pages are looked at); else it starts over.
        Keys are built page by page as the walk needs them."""
        limit = (request.num_tokens - 1) // self.page_size * self.page_size
        cache, memo = self.cache, request.prefix_match
        start: Optional[PrefixMatch] = None
        if memo is not None:
            version, memo_limit, match = memo
            if version == cache.version and memo_limit == limit:
                return match
            if match.num_tokens <= limit and cache.is_live(match.node):
                start = match
        begin = start.num_tokens if start is not None else 0
        match = cache.look(self._page_keys(request, begin, limit), start)
        request.prefix_match = (cache.version, limit, match)
        return match

    def _page_keys(self, request: Request, start: int, end: int) -> Iterator[PageKey]:
        for page_start in range(start, end, self.page_size):
            yield tuple(request.position_keys(page_start, page_start + self.page_size))

    def admit(self, request: Request, match: PrefixMatch, num_new_tokens: int) -> bool:
        """Attaches the matched prefix (marking it recently used) and
        allocates pages for num_new_tokens after it; on failure the request
        is left holding nothing."""
        request.page_table = list(match.pages)
        request.num_shared_pages = len(match.pages)
        request.num_computed_tokens = match.num_tokens
        request.cache_node = match.node
        self.cache.lock(match.node)
        if self.reserve(request, match.num_tokens + num_new_tokens) and self._take_images(request):
            self.cache.touch(match.node)
            return True
        self.release(request)
        return False

    def _take_images(self, request: Request) -> bool:
        """References to the request's image K/V pages (allocated, after
        evicting cached pages if needed, for images not in the table)."""
        items = [item for item in _distinct_images(request) if item.num_cross_rows]
        if not items:
            return True
        if not self.make_free(self.images.num_missing_pages(items)):
            return False
        for item in items:
            entry = self.images.acquire(item)
            if entry is None:
                return False
            request.image_kv.append(entry)
        return True

    def reserve(self, request: Request, num_tokens: int) -> bool:
        """Grows the page table to cover positions [0, num_tokens)."""
        num_missing = self.num_pages_for(num_tokens) - len(request.page_table)
        if num_missing <= 0:
            return True
        if not self.make_free(num_missing):
            return False
        request.page_table.extend(self.allocator.alloc(num_missing))
        return True

    def make_free(self, num_pages: int) -> bool:
        """Evicts cached pages until num_pages are free; False if impossible."""
        shortfall = num_pages - self.allocator.num_free
        if shortfall > 0:
            self.cache.evict(shortfall)
        return self.allocator.num_free >= num_pages

    def cache_computed(self, request: Request) -> None:
        """Hands the full pages of the computed tokens to the radix cache and
        points the page table at the tree's copies (freeing duplicates)."""
        num_full_pages = request.num_computed_tokens // self.page_size
        if num_full_pages <= request.num_shared_pages:
            return
        keys = request.position_keys(0, num_full_pages * self.page_size)
        inserted = self.cache.insert(keys, request.page_table[:num_full_pages])
        if request.image_kv:
            self._hold_node_images(inserted.node)
        if len(inserted.pages) > request.num_shared_pages:
            self._adopt(request, inserted)

    def release(self, request: Request) -> None:
        """Unlocks the shared prefix, frees the request's own pages and drops
        its image K/V references."""
        self.allocator.free(request.page_table[request.num_shared_pages:])
        if request.cache_node is not None:
            self.cache.unlock(request.cache_node)
        request.page_table = []
        request.num_shared_pages = 0
        request.cache_node = None
        for entry in request.image_kv:
            self.images.release(entry)
        request.image_kv = []

    def mark_images_written(self, request: Request) -> None:
        """The request's step succeeded: its images' K/V are in their pages."""
        for entry in request.image_kv:
            entry.is_written = True

    # ---- image K/V kept alive by radix nodes --------------------------------

    def _hold_node_images(self, node: RadixNode) -> None:
        """Each node of the path that holds an image's token (key ("img",
        hash, index)) keeps that image's K/V; set once per node."""
        for path_node in self.cache.path_to_root(node):
            if path_node.attachments is not None:
                break  # its ancestors were set when it was
            keys = {key[1] for key in path_node.key if isinstance(key, tuple) and key[0] == "img"}
            path_node.attachments = tuple(k for k in keys if self.images.hold_for_node(k))

    def _drop_node_images(self, node: RadixNode) -> None:
        for key in node.attachments or ():
            self.images.drop_for_node(key)
        node.attachments = None

    def _adopt(self, request: Request, inserted: PrefixMatch) -> None:
        for index in range(request.num_shared_pages, len(inserted.pages)):
            if request.page_table[index] != inserted.pages[index]:
                self.allocator.free([request.page_table[index]])
                request.page_table[index] = inserted.pages[index]
        self.cache.lock(inserted.node)
        self.cache.unlock(request.cache_node)
        request.cache_node = inserted.node
        request.num_shared_pages = len(inserted.pages)


def _distinct_images(request: Request) -> List[MultimodalItem]:
    """The request's images, each content hash once."""
    seen, items = set(), []
    for item in request.mm_items:
        if item.hash not in seen:
            seen.add(item.hash)
            items.append(item)
    return items
