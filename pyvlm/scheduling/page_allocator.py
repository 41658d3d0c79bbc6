"""The free list of KV-cache pages."""

from typing import Iterable, List, Optional


class PageAllocator:
    """Hands out page ids in [0, num_total); freeing a page twice is a bug
    and raises, so accounting errors surface where they happen."""

    def __init__(self, num_pages: int):
        self.num_total = num_pages
        self._free: List[int] = list(range(num_pages - 1, -1, -1))  # pop() yields low ids first
        self._is_free = [True] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_total - len(self._free)

    def alloc(self, num_pages: int) -> Optional[List[int]]:
        """num_pages page ids, or None (and nothing taken) when too few are free."""
        if num_pages > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(num_pages)]
        for page in pages:
            self._is_free[page] = False
        return pages

    def free(self, pages: Iterable[int]) -> None:
        for page in pages:
            if self._is_free[page]:
                raise ValueError(f"page {page} freed twice")
            self._is_free[page] = True
            self._free.append(page)

    def is_free(self, page: int) -> bool:
        return self._is_free[page]
