"""Page bookkeeping of requests: prefix matching, growth, caching, release.

Ties the page allocator and the radix cache to requests. A request's page
table is [tree-owned pages (locked through request.cache_node)] followed by
[pages only it owns]; these functions keep that split true.
"""

from pyvlm.scheduling.page_allocator import PageAllocator
from pyvlm.scheduling.radix_cache import PrefixMatch, RadixCache
from pyvlm.scheduling.request import Request


class KVManager:
    """The page pool and prefix cache as the scheduler uses them."""

    def __init__(self, num_pages: int, page_size: int, enable_radix_cache: bool = True):
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        self.cache = RadixCache(page_size, self.allocator, enabled=enable_radix_cache)

    @property
    def num_total_pages(self) -> int:
        return self.allocator.num_total

    @property
    def num_used_pages(self) -> int:
        """Pages held by requests (evictable cached pages count as free)."""
        return self.allocator.num_used - self.cache.num_evictable_pages

    def num_pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def match(self, request: Request) -> PrefixMatch:
        """The cached prefix a (re)admission can reuse: whole pages, and never
        the whole sequence (the last token must run to produce logits)."""
        limit = (request.num_tokens - 1) // self.page_size * self.page_size
        return self.cache.match_prefix(request.position_keys(0, limit))

    def admit(self, request: Request, match: PrefixMatch, num_new_tokens: int) -> bool:
        """Attaches the matched prefix and allocates pages for num_new_tokens
        after it; on failure the request is left holding nothing."""
        request.page_table = list(match.pages)
        request.num_shared_pages = len(match.pages)
        request.num_computed_tokens = match.num_tokens
        request.cache_node = match.node
        self.cache.lock(match.node)
        if self.reserve(request, match.num_tokens + num_new_tokens):
            return True
        self.release(request)
        return False

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
        if len(inserted.pages) > request.num_shared_pages:
            self._adopt(request, inserted)

    def release(self, request: Request) -> None:
        """Unlocks the shared prefix and frees the request's own pages."""
        self.allocator.free(request.page_table[request.num_shared_pages:])
        if request.cache_node is not None:
            self.cache.unlock(request.cache_node)
        request.page_table = []
        request.num_shared_pages = 0
        request.cache_node = None

    def _adopt(self, request: Request, inserted: PrefixMatch) -> None:
        for index in range(request.num_shared_pages, len(inserted.pages)):
            if request.page_table[index] != inserted.pages[index]:
                self.allocator.free([request.page_table[index]])
                request.page_table[index] = inserted.pages[index]
        self.cache.lock(inserted.node)
        self.cache.unlock(request.cache_node)
        request.cache_node = inserted.node
        request.num_shared_pages = len(inserted.pages)
