"""Prefix cache: a radix tree over position keys at page granularity.

Each node below the root holds one full page: its page_size position keys
and the page id with their KV. Only whole pages are cached, so a page in the
tree is never written again; a request's partial last page stays its own.
Nodes on a path locked by a live request (reference counts) are never
evicted; unlocked leaves are evicted least recently used first, from a heap
kept as nodes become (or are touched as) evictable leaves, so an eviction
never walks the whole tree (stale heap entries are skipped when popped).
`version` counts the changes of the tree's shape, so a look taken earlier
is known to still hold (and one whose deepest node is still in the tree
can be continued from there instead of walked again).
"""

import heapq
import itertools
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from pyvlm.scheduling.page_allocator import PageAllocator
from pyvlm.scheduling.request import PositionKey

PageKey = Tuple[PositionKey, ...]


class RadixNode:
    """One cached page. attachments: what the owner of the cache keeps alive
    with this page (image K/V references); None until the owner sets it."""

    __slots__ = ("parent", "key", "page", "children", "lock_ref", "last_access", "attachments")

    def __init__(self, parent: Optional["RadixNode"], key: PageKey, page: int, now: int):
        self.parent = parent
        self.key = key
        self.page = page
        self.children: Dict[PageKey, "RadixNode"] = {}
        self.lock_ref = 0
        self.last_access = now
        self.attachments: Optional[tuple] = None

    @property
    def is_root(self) -> bool:
        return self.parent is None


class PrefixMatch(NamedTuple):
    """The cached pages of a key prefix and the deepest node reached
    (the root when nothing matched); lock `node` to keep the pages."""

    pages: List[int]
    num_tokens: int
    node: RadixNode


class RadixCache:
    """match_prefix / insert / lock / unlock / evict over one page pool.

    enabled False (--disable-radix-cache): nothing matches and nothing is
    inserted, so every page stays owned by its request. on_remove(node) is
    called for every node that leaves the tree (evicted or reset), before
    its page is freed.
    """

    def __init__(self, page_size: int, allocator: PageAllocator, enabled: bool = True,
                 on_remove: Optional[Callable[[RadixNode], None]] = None):
        self.page_size = page_size
        self.allocator = allocator
        self.enabled = enabled
        self.on_remove = on_remove
        self._clock = itertools.count(1)
        self.root = RadixNode(None, (), -1, 0)
        self.num_pages = 0
        self.num_protected_pages = 0
        self._leaf_heap: List[Tuple[int, int, RadixNode]] = []  # (last_access, seq, node)
        self._heap_seq = itertools.count()
        self.version = 0  # bumped whenever a node joins or leaves the tree

    @property
    def num_evictable_pages(self) -> int:
        return self.num_pages - self.num_protected_pages

    def match_prefix(self, keys: Sequence[PositionKey], touch: bool = True) -> PrefixMatch:
        """The longest cached prefix of keys, in whole pages; touch marks
        the path recently used (not for a look that admits nothing, such as
        ordering the queue)."""
        match = self.look(self._page_keys(keys))
        if touch:
            self.touch(match.node)
        return match

    def look(self, page_keys: Iterable[PageKey], start: Optional[PrefixMatch] = None) -> PrefixMatch:
        """The longest cached prefix of page_keys (one tuple of page_size
        keys per page, consumed only as far as they match), leaving the LRU
        order as it is. start: an earlier look at the same keys whose node
        is_live; page_keys then begin after it and the walk goes on from
        there. The returned pages may be start's list: never mutate them."""
        if not self.enabled:
            return PrefixMatch([], 0, self.root)
        node, pages = (self.root, []) if start is None else (start.node, start.pages)
        new_pages = []
        for page_key in page_keys:
            child = node.children.get(page_key)
            if child is None:
                break
            node = child
            new_pages.append(node.page)
        if new_pages:
            pages = pages + new_pages
        return PrefixMatch(pages, len(pages) * self.page_size, node)

    def touch(self, node: RadixNode) -> None:
        """Marks node and its ancestors recently used (a match admitted)."""
        now = next(self._clock)
        for path_node in self._path_to_root(node):
            path_node.last_access = now
        self._offer(node)  # only the deepest node of a path can be a leaf

    def is_live(self, node: RadixNode) -> bool:
        """Whether node is (still) in the tree; its path and pages are then
        those it had when matched (only leaves leave, and a key's node is
        never replaced while it stays)."""
        if node is self.root:
            return True
        parent = node.parent
        return parent is not None and parent.children.get(node.key) is node

    def insert(self, keys: Sequence[PositionKey], pages: Sequence[int]) -> PrefixMatch:
        """Caches the full pages of keys (pages[i] holds page i's KV).

        Pages already cached under the same keys win: the returned match
        lists the tree's page for every page of the path, and the caller
        frees each of its own pages that differs (a duplicate).
        """
        if not self.enabled:
            return PrefixMatch([], 0, self.root)
        node, tree_pages, now = self.root, [], next(self._clock)
        for page_key, page in zip(self._page_keys(keys), pages):
            node = node.children.get(page_key) or self._add_child(node, page_key, page)
            node.last_access = now
            tree_pages.append(node.page)
        self._offer(node)
        return PrefixMatch(tree_pages, len(tree_pages) * self.page_size, node)

    def lock(self, node: RadixNode) -> None:
        """Protects node and its ancestors from eviction."""
        for path_node in self._path_to_root(node):
            if path_node.lock_ref == 0:
                self.num_protected_pages += 1
            path_node.lock_ref += 1

    def num_unprotected_on_path(self, node: RadixNode) -> int:
        """Pages that locking node would newly protect (now evictable)."""
        return sum(path_node.lock_ref == 0 for path_node in self._path_to_root(node))

    def unlock(self, node: RadixNode) -> None:
        for path_node in self._path_to_root(node):
            if path_node.lock_ref <= 0:
                raise RuntimeError("radix cache: unlock of an unlocked node")
            path_node.lock_ref -= 1
            if path_node.lock_ref == 0:
                self.num_protected_pages -= 1
                self._offer(path_node)

    def evict(self, num_pages: int) -> int:
        """Frees up to num_pages unlocked pages, least recently used leaves
        first; returns how many were freed."""
        num_freed = 0
        while self._leaf_heap and num_freed < num_pages:
            last_access, _, leaf = heapq.heappop(self._leaf_heap)
            if last_access != leaf.last_access or not self._is_in_tree(leaf) \
                    or not self._is_evictable_leaf(leaf):
                continue  # stale: touched since, removed, locked or no longer a leaf
            self._offer(self._remove_leaf(leaf))
            num_freed += 1
        return num_freed

    def reset(self) -> None:
        """Drops every cached page (flush_cache); only valid with no locks."""
        if self.num_protected_pages:
            raise RuntimeError("radix cache: reset while pages are in use")
        nodes = list(self.nodes())
        if self.on_remove is not None:
            for node in nodes:
                self.on_remove(node)
        self.allocator.free(node.page for node in nodes)
        for node in nodes:
            node.parent = None  # out of the tree: is_live must say so
        self.root = RadixNode(None, (), -1, 0)
        self.num_pages = 0
        self.version += 1
        self._leaf_heap.clear()

    def nodes(self) -> Iterator[RadixNode]:
        """Every node holding a page (depth first)."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    def _page_keys(self, keys: Sequence[PositionKey]) -> Iterator[PageKey]:
        size = self.page_size
        for start in range(0, len(keys) - size + 1, size):
            yield tuple(keys[start:start + size])

    def _add_child(self, parent: RadixNode, page_key: PageKey, page: int) -> RadixNode:
        child = RadixNode(parent, page_key, page, 0)
        parent.children[page_key] = child
        self.num_pages += 1
        self.version += 1
        return child

    def _remove_leaf(self, leaf: RadixNode) -> RadixNode:
        parent = leaf.parent
        del parent.children[leaf.key]
        self.version += 1
        if self.on_remove is not None:
            self.on_remove(leaf)
        self.allocator.free([leaf.page])
        self.num_pages -= 1
        return parent

    def path_to_root(self, node: RadixNode) -> Iterator[RadixNode]:
        """node, its parent, ... up to (not including) the root."""
        return self._path_to_root(node)

    def _path_to_root(self, node: RadixNode) -> Iterator[RadixNode]:
        while not node.is_root:
            yield node
            node = node.parent

    def _is_evictable_leaf(self, node: RadixNode) -> bool:
        return not node.is_root and not node.children and node.lock_ref == 0

    def _is_in_tree(self, node: RadixNode) -> bool:
        return not node.is_root and self.is_live(node)

    def _offer(self, node: RadixNode) -> None:
        """Queues node for eviction if it is (now) an evictable leaf. The heap
        is rebuilt from the tree when stale entries outnumber the pages."""
        if not self._is_evictable_leaf(node):
            return
        heapq.heappush(self._leaf_heap, (node.last_access, next(self._heap_seq), node))
        if len(self._leaf_heap) > 2 * self.num_pages + 64:
            self._leaf_heap = [(leaf.last_access, next(self._heap_seq), leaf)
                               for leaf in self.nodes() if self._is_evictable_leaf(leaf)]
            heapq.heapify(self._leaf_heap)
