"""Test doubles for the scheduling core: a runner that emulates the KV cache
slot by slot, an independent reference generator, and the invariants that
must hold after every scheduler step."""

import hashlib
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence

from pyvlm.scheduling.request import Request
from pyvlm.scheduling.types import ForwardBatch, MultimodalItem, SampleResult, SequenceChunk

VOCAB = list(range(10, 42))
IMAGE_TOKEN = 5


def expected_keys(token_ids: Sequence[int], mm_items: Sequence[MultimodalItem]) -> list:
    """What the KV at each position depends on: the token, or the image content.
    (Written independently of Request.position_keys.)"""
    keys = list(token_ids)
    for item in mm_items:
        for index in range(item.length):
            if item.offset + index < len(keys):
                keys[item.offset + index] = ("image", item.hash, index)
    return keys


def fake_token(keys: Sequence, seed: int, step: int) -> int:
    """The 'model': a deterministic function of the whole sequence, seed, step."""
    digest = hashlib.blake2b(repr((list(keys), seed, step)).encode(), digest_size=8).digest()
    return VOCAB[int.from_bytes(digest, "little") % len(VOCAB)]


def reference_generate(prompt_ids, mm_items, seed, max_new_tokens, stop_token_ids=()) -> List[int]:
    """Plain sequential generation with the fake model (no scheduler)."""
    output: List[int] = []
    while len(output) < max_new_tokens:
        token = fake_token(expected_keys(list(prompt_ids) + output, mm_items), seed, len(output))
        output.append(token)
        if token in stop_token_ids:
            break
    return output


def stage_of(chunk: SequenceChunk) -> str:
    """"decode": one token fed after the prompt (in a decode batch, or mixed
    into a prefill batch); "prefill" otherwise."""
    is_decode = chunk.num_new_tokens == 1 and chunk.start_pos >= len(chunk.prompt_ids)
    return "decode" if is_decode else "prefill"


class FakeRunner:
    """A ModelRunner whose 'KV cache' is a dict slot -> (key, position).

    Before running a chunk it checks that every earlier position of the
    sequence sits, with the right key, in the slot its page table names:
    page-table, prefix-cache and preemption bugs all break this.
    """

    def __init__(self, page_size: int, num_pages: int):
        self.page_size = page_size
        self.num_pages = num_pages
        self.slots: Dict[int, tuple] = {}
        self.images: Dict[str, List[MultimodalItem]] = {}
        self.batches: List[ForwardBatch] = []
        self.encoder_cache_cleared = 0

    def register(self, request: Request) -> Request:
        self.images[request.rid] = list(request.mm_items)
        return request

    def forward(self, batch: ForwardBatch) -> List[Optional[SampleResult]]:
        self.batches.append(batch)
        assert batch.chunks, "empty batch"
        return [self._run_chunk(chunk, batch.is_decode) for chunk in batch.chunks]

    def free_encoder_cache(self) -> None:
        self.encoder_cache_cleared += 1

    def _slot(self, chunk: SequenceChunk, position: int) -> int:
        page = chunk.page_table[position // self.page_size]
        assert 0 <= page < self.num_pages
        return page * self.page_size + position % self.page_size

    def _run_chunk(self, chunk: SequenceChunk, is_decode: bool) -> Optional[SampleResult]:
        full = list(chunk.prompt_ids) + list(chunk.output_ids)
        keys = expected_keys(full, self.images[chunk.rid])
        end = chunk.start_pos + chunk.num_new_tokens
        assert chunk.token_ids == full[chunk.start_pos:end], "fed tokens differ from the sequence"
        assert chunk.sample == (end == len(full)), "sample flag must mark the sequence's last token"
        assert chunk.step == len(chunk.output_ids)
        assert not is_decode or (chunk.num_new_tokens == 1 and chunk.sample)
        assert len(chunk.page_table) * self.page_size >= end, "page table too short"
        self._check_images(chunk, end)
        for position in range(chunk.start_pos):
            assert self.slots.get(self._slot(chunk, position)) == (keys[position], position), (
                f"{chunk.rid}: KV of position {position} missing or overwritten")
        for position in range(chunk.start_pos, end):
            self.slots[self._slot(chunk, position)] = (keys[position], position)
        if not chunk.sample:
            return None
        token = fake_token(keys, chunk.seed, chunk.step)
        return SampleResult(token, logprob=-token / 100.0, top_logprobs=((token, -token / 100.0),))

    def _check_images(self, chunk: SequenceChunk, end: int) -> None:
        wanted = [item for item in self.images[chunk.rid]
                  if item.offset < end and chunk.start_pos < item.offset + item.length]
        assert list(chunk.mm_items) == wanted


def check_invariants(scheduler) -> None:
    """Page accounting and radix-cache reference counts after a step."""
    kv = scheduler.kv
    allocator, cache = kv.allocator, kv.cache
    free = {page for page in range(allocator.num_total) if allocator.is_free(page)}
    assert allocator.num_free == len(free)
    assert allocator.num_free + allocator.num_used == allocator.num_total
    nodes = list(cache.nodes())
    tree_pages = [node.page for node in nodes]
    assert len(set(tree_pages)) == len(tree_pages) == cache.num_pages
    live = list(scheduler.requests.values())
    owned = [page for request in live for page in request.page_table[request.num_shared_pages:]]
    image_pages = [page for entry in kv.images.entries.values() for page in entry.pages]
    assert len(set(owned)) == len(owned), "a page is owned by two live requests"
    assert len(set(image_pages)) == len(image_pages), "a page holds two images' K/V"
    assert not set(owned) & set(tree_pages), "a request owns a page of the tree"
    assert not set(image_pages) & (set(owned) | set(tree_pages)), "an image page is a text page"
    in_use = set(owned) | set(tree_pages) | set(image_pages)
    assert not in_use & free, "a page in use is on the free list"
    assert free | in_use == set(range(allocator.num_total)), "a page leaked"
    _check_locks(scheduler, cache, live, nodes)
    _check_image_refs(kv, live, nodes)


def _check_image_refs(kv, live, nodes) -> None:
    """Each image's K/V is referenced by exactly the live requests that
    hold it and the radix nodes that keep it, and by nothing else."""
    request_refs = Counter(entry.key for request in live for entry in request.image_kv)
    node_refs = Counter(key for node in nodes for key in node.attachments or ())
    for key, entry in kv.images.entries.items():
        assert entry.num_request_refs == request_refs[key], "image K/V request refs off"
        assert entry.num_node_refs == node_refs[key], "image K/V node refs off"
        assert entry.num_request_refs + entry.num_node_refs > 0, "an unused image K/V kept"
    assert set(request_refs) | set(node_refs) <= set(kv.images.entries)


def _check_locks(scheduler, cache, live, nodes) -> None:
    expected_refs = Counter()
    for request in live:
        path = _path(cache, request.cache_node) if request.cache_node is not None else []
        assert request.page_table[:request.num_shared_pages] == [node.page for node in path]
        expected_refs.update(id(node) for node in path)
    for node in nodes:
        assert node.lock_ref == expected_refs[id(node)] >= 0
    assert cache.num_protected_pages == sum(node.lock_ref > 0 for node in nodes)
    for request in scheduler.waiting:
        assert request.page_table == [] and request.cache_node is None


def _path(cache, node) -> list:
    """Root-to-node path; asserts the node is still in the tree (not evicted)."""
    path = []
    while node is not cache.root:
        assert node.parent is not None and node.parent.children.get(node.key) is node, "locked node evicted"
        path.append(node)
        node = node.parent
    return path[::-1]


def run_until_idle(scheduler, runner, max_steps: int = 20000, on_step=None) -> Dict[str, list]:
    """Steps the scheduler to completion, checking invariants after each step;
    returns each rid's outputs in order."""
    outputs = defaultdict(list)
    for _ in range(max_steps):
        if not scheduler.has_work():
            return outputs
        for output in scheduler.step(runner):
            outputs[output.rid].append(output)
        check_invariants(scheduler)
        if on_step is not None:
            on_step(outputs)
    raise AssertionError("scheduler did not finish")


def joined_ids(outputs: list) -> List[int]:
    return [token for output in outputs for token in output.new_token_ids]
