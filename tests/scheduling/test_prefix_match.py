"""The prefix-cache look a waiting request keeps (lpm ordering, admission):
reused while the tree's shape is unchanged, continued from its last node
after inserts, walked again after that node is evicted or the cache reset,
always equal to a fresh walk, and never touching the LRU order."""

from pyvlm.scheduling.kv_manager import KVManager
from pyvlm.scheduling.request import Request

from tests.scheduling.fakes import VOCAB
from tests.scheduling.workload import random_specs, run_specs

PAGE = 4


def fresh_match(kv: KVManager, request: Request):
    """The uncached answer: every key built, the whole path walked."""
    limit = (request.num_tokens - 1) // PAGE * PAGE
    return kv.cache.match_prefix(request.position_keys(0, limit), touch=False)


def assert_same(match, expected):
    assert match.pages == expected.pages and match.num_tokens == expected.num_tokens
    assert match.node is expected.node


def cache_prompt(kv: KVManager, keys):
    """Inserts keys' full pages as a finished request would."""
    pages = kv.allocator.alloc(len(keys) // PAGE)
    inserted = kv.cache.insert(keys, pages)
    kv.allocator.free(p for p, tree_page in zip(pages, inserted.pages) if p != tree_page)


class CountingRequest(Request):
    """Counts the position keys built for it (the cost of a walk)."""

    num_keys_built = 0

    def position_keys(self, start=0, end=None):
        keys = super().position_keys(start, end)
        self.num_keys_built += len(keys)
        return keys


def looked(kv: KVManager, request: CountingRequest):
    """kv.match(request), checked against a fresh walk, and the keys it built."""
    expected = fresh_match(kv, request)
    request.num_keys_built = 0
    match = kv.match(request)
    assert_same(match, expected)
    return match.num_tokens, request.num_keys_built


def test_the_look_follows_the_tree(rng):
    kv = KVManager(64, PAGE)
    prompt = [rng.choice(VOCAB) for _ in range(6 * PAGE + 1)]
    request = CountingRequest("r", prompt)
    cache_prompt(kv, prompt[:2 * PAGE])
    assert looked(kv, request) == (2 * PAGE, 3 * PAGE)  # two pages matched, the third missed
    assert looked(kv, request) == (2 * PAGE, 0)  # an unchanged tree: nothing walked
    cache_prompt(kv, [VOCAB[0]] * PAGE)  # another branch: the look goes on from its node
    assert looked(kv, request) == (2 * PAGE, PAGE)
    cache_prompt(kv, prompt[:5 * PAGE])  # the prefix grows: only pages past the look are keyed
    assert looked(kv, request) == (5 * PAGE, 4 * PAGE)
    assert kv.cache.evict(4) == 4  # the other branch, then three pages of the prompt's
    assert looked(kv, request) == (2 * PAGE, 3 * PAGE)  # its node is gone: walked again
    kv.cache.reset()
    assert looked(kv, request) == (0, PAGE)
    assert kv.match(request).node is kv.cache.root


def test_a_look_never_touches_the_lru_order(rng):
    kv = KVManager(8, PAGE)
    prompt = [rng.choice(VOCAB) for _ in range(3 * PAGE + 1)]
    cache_prompt(kv, prompt[:3 * PAGE])
    ages = lambda: {id(node): node.last_access for node in kv.cache.nodes()}  # noqa: E731
    before = ages()
    request = Request("r", prompt)
    match = kv.match(request)
    assert match.num_tokens == 3 * PAGE and ages() == before
    # admission touches the prefix it takes only if it succeeds
    hog = kv.allocator.alloc(kv.allocator.num_free)
    assert not kv.admit(request, match, 100 * PAGE) and ages() == before
    kv.allocator.free(hog)
    assert kv.admit(request, kv.match(request), 1) and ages() != before


def test_kept_looks_equal_fresh_walks_on_random_workloads(rng):
    """lpm on a tight pool (evictions, re-insertions, preemptions): after
    every step each waiting request's kept look equals a fresh walk."""
    specs = random_specs(rng, 40, max_new_tokens=30)
    largest = max(len(spec.prompt_ids) + spec.max_new_tokens for spec in specs)
    num_checked = []

    def check(scheduler, outputs):
        kv = scheduler.kv
        for request in scheduler.waiting:
            assert_same(kv.match(request), fresh_match(kv, request))
            num_checked.append(request.prefix_match is not None)

    result = run_specs(specs, page_size=PAGE, num_pages=3 * (-(-largest // PAGE)),
                       schedule_policy="lpm", max_running_requests=4, on_step=check)
    for spec in specs:
        assert result.output_ids[spec.rid] == spec.reference(), spec.rid
    assert len(num_checked) > 100 and all(num_checked)
    assert result.scheduler.metrics.cache_hit_rate > 0


def reference_keys(request: Request) -> list:
    """Every position's key, built position by position (the token; its
    image's content and index inside an image span; the images' hash
    beside the token before the first image when pre_image_key is set)."""
    keys, items = [], request.mm_items
    first_image = min((item.offset for item in items), default=None)
    for pos, token in enumerate(request.prompt_ids + request.output_ids):
        key = token
        if request.pre_image_key is not None and first_image is not None and pos < first_image:
            key = ("pre", request.pre_image_key, token)
        for item in items:
            if item.offset <= pos < item.offset + item.length:
                key = ("img", item.hash, pos - item.offset)
        keys.append(key)
    return keys


def test_position_keys_of_any_span_equal_a_position_by_position_build(rng):
    from pyvlm.scheduling.types import MultimodalItem

    for _ in range(200):
        prompt = [rng.choice(VOCAB) for _ in range(rng.randint(1, 40))]
        offsets = sorted(rng.sample(range(len(prompt)), min(len(prompt), rng.randint(0, 2))))
        items = [MultimodalItem(rng.getrandbits(60), offset, rng.randint(1, len(prompt) - offset))
                 for offset in offsets]
        request = Request("r", prompt, mm_items=items,
                          pre_image_key=rng.choice([None, rng.getrandbits(60)]))
        request.output_ids = [rng.choice(VOCAB) for _ in range(rng.randint(0, 10))]
        expected = reference_keys(request)
        for _ in range(5):  # (the prompt's keys are built once, then sliced)
            start = rng.randint(0, request.num_tokens)
            end = rng.randint(start, request.num_tokens)
            assert request.position_keys(start, end) == expected[start:end]
        assert request.position_keys() == expected
