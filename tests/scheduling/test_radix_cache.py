"""Radix cache and page allocator: matching, dedup, locking, LRU eviction."""

import pytest

from pyvlm.scheduling.page_allocator import PageAllocator
from pyvlm.scheduling.radix_cache import RadixCache
from pyvlm.scheduling.request import Request
from pyvlm.scheduling.types import MultimodalItem

PAGE = 4


def make_cache(num_pages=64, enabled=True):
    allocator = PageAllocator(num_pages)
    return RadixCache(PAGE, allocator, enabled), allocator


def insert_fresh(cache, allocator, keys):
    """Caches keys with newly allocated pages (as a finished request would)."""
    pages = allocator.alloc(len(keys) // PAGE)
    inserted = cache.insert(keys, pages)
    allocator.free(p for p, tree_page in zip(pages, inserted.pages) if p != tree_page)
    return inserted


def test_allocator_counts_and_double_free(rng):
    allocator = PageAllocator(10)
    pages = allocator.alloc(7)
    assert len(set(pages)) == 7 and allocator.num_free == 3 and allocator.num_used == 7
    assert allocator.alloc(4) is None and allocator.num_free == 3
    allocator.free(pages[:2])
    assert allocator.num_free == 5
    with pytest.raises(ValueError):
        allocator.free(pages[:1])


def test_match_whole_pages_only(rng):
    cache, allocator = make_cache()
    keys = [rng.randrange(100) for _ in range(3 * PAGE + 2)]
    inserted = insert_fresh(cache, allocator, keys)
    assert len(inserted.pages) == 3
    match = cache.match_prefix(keys[:2 * PAGE + 3] + [999])
    assert match.pages == inserted.pages[:2] and match.num_tokens == 2 * PAGE
    diverging = keys[:PAGE + 1] + [1000] + keys[PAGE + 2:]
    assert cache.match_prefix(diverging).pages == inserted.pages[:1]


def test_insert_deduplicates(rng):
    cache, allocator = make_cache()
    keys = [rng.randrange(100) for _ in range(4 * PAGE)]
    first = insert_fresh(cache, allocator, keys[:2 * PAGE])
    mine = allocator.alloc(4)
    second = cache.insert(keys, mine)
    assert second.pages == first.pages + mine[2:]  # the tree's pages win for the shared prefix
    assert cache.num_pages == 4


def image_request(image_hash, rid="r"):
    prompt = [1, 2, 3, 4] + [5] * 8 + [6, 7, 8, 9, 10]
    return Request(rid, prompt, mm_items=[MultimodalItem(image_hash, 4, 8)])


def test_same_image_hits_other_image_misses(rng):
    cache, allocator = make_cache()
    first, second = rng.getrandbits(63), rng.getrandbits(63)
    insert_fresh(cache, allocator, image_request(first).position_keys())
    assert cache.match_prefix(image_request(first).position_keys()).num_tokens == 16  # 4 full pages
    assert cache.match_prefix(image_request(second).position_keys()).num_tokens == PAGE  # text page only


def test_locked_pages_survive_eviction_and_lru_order(rng):
    cache, allocator = make_cache(num_pages=16)
    paths = [[branch] * (2 * PAGE) for branch in range(3)]  # three 2-page branches
    nodes = [insert_fresh(cache, allocator, keys).node for keys in paths]
    cache.match_prefix(paths[0])  # branch 0 becomes the most recently used
    cache.lock(nodes[2])
    assert cache.num_protected_pages == 2 and cache.num_evictable_pages == 4
    assert cache.evict(3) == 3  # branch 1 (oldest unlocked) goes first, then branch 0's leaf
    assert cache.match_prefix(paths[1]).num_tokens == 0
    assert cache.match_prefix(paths[0]).num_tokens == PAGE
    assert cache.match_prefix(paths[2]).num_tokens == 2 * PAGE
    assert cache.evict(10) == 1 and cache.num_pages == 2  # only the locked branch remains
    cache.unlock(nodes[2])
    assert cache.evict(10) == 2 and allocator.num_used == 0
    with pytest.raises(RuntimeError):
        cache.unlock(nodes[2])


def test_reset_and_disabled_mode(rng):
    cache, allocator = make_cache()
    keys = [rng.randrange(100) for _ in range(3 * PAGE)]
    insert_fresh(cache, allocator, keys)
    cache.reset()
    assert allocator.num_used == 0 and cache.match_prefix(keys).num_tokens == 0
    disabled, allocator = make_cache(enabled=False)
    pages = allocator.alloc(3)
    assert disabled.insert(keys, pages).pages == [] and disabled.num_pages == 0
    assert disabled.match_prefix(keys).num_tokens == 0


def test_eviction_pops_lru_leaves_without_walking_the_tree(rng, monkeypatch):
    """Least recently used leaves go first, a touched leaf moves back, and
    evict never visits the whole tree (it pops a heap kept as leaves
    appear); the heap stays bounded however often leaves are touched."""
    cache, allocator = make_cache(num_pages=256)
    paths = [[rng.randrange(1000) for _ in range(2 * PAGE)] for _ in range(6)]
    for keys in paths:
        insert_fresh(cache, allocator, keys)
    cache.match_prefix(paths[0])  # paths[0] becomes the most recently used
    for _ in range(500):
        cache.match_prefix(paths[1])
    assert len(cache._leaf_heap) <= 2 * cache.num_pages + 64

    def walk():
        raise AssertionError("evict walked the tree")

    monkeypatch.setattr(cache, "nodes", walk)
    # a leaf's eviction makes its parent a leaf of the same age: four paths
    # of two pages go, the two touched ones stay whole
    assert cache.evict(8) == 8
    cached = [len(cache.match_prefix(keys).pages) for keys in paths]
    assert cached == [2, 2, 0, 0, 0, 0]


def test_a_look_without_touch_leaves_the_lru_order(rng):
    cache, allocator = make_cache(num_pages=64)
    old, new = ([rng.randrange(1000) for _ in range(PAGE)] for _ in range(2))
    insert_fresh(cache, allocator, old)
    insert_fresh(cache, allocator, new)
    assert len(cache.match_prefix(old, touch=False).pages) == 1
    assert cache.evict(1) == 1  # the untouched old page is still the least recent
    assert cache.match_prefix(old).pages == [] and len(cache.match_prefix(new).pages) == 1
