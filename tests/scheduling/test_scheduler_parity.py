"""Chunking, the prefix cache and preemption never change what is generated:
every configuration reproduces plain sequential generation, while the fake
runner checks every position's KV on every step."""

import pytest

from tests.scheduling.fakes import VOCAB
from tests.scheduling.workload import RequestSpec, random_specs, run_specs


def assert_matches_reference(specs, result):
    for spec in specs:
        assert result.output_ids[spec.rid] == spec.reference(), spec.rid
        assert result.outputs[spec.rid][-1].finished


def assert_all_pages_back(result):
    kv = result.scheduler.kv
    assert kv.cache.num_protected_pages == 0
    assert kv.allocator.num_used == kv.cache.num_pages  # only the cache holds pages when idle
    assert result.scheduler.flush_cache()
    assert kv.allocator.num_used == 0


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("chunked_prefill_size", [None, 3, 8, 64])
@pytest.mark.parametrize("disable_radix_cache", [False, True])
@pytest.mark.parametrize("enable_mixed_chunk", [True, False])
def test_outputs_match_sequential_generation(rng, page_size, chunked_prefill_size, disable_radix_cache,
                                             enable_mixed_chunk):
    specs = random_specs(rng, 12)
    result = run_specs(specs, page_size=page_size, chunked_prefill_size=chunked_prefill_size,
                       disable_radix_cache=disable_radix_cache, enable_mixed_chunk=enable_mixed_chunk)
    assert_matches_reference(specs, result)
    assert_all_pages_back(result)


def test_prefix_cache_is_used(rng):
    specs = random_specs(rng, 16)
    cached = run_specs(specs).outputs
    uncached = run_specs(specs, disable_radix_cache=True).outputs
    assert sum(outs[-1].cached_tokens for outs in cached.values()) > 0
    assert sum(outs[-1].cached_tokens for outs in uncached.values()) == 0


def contending_specs(rng, num_requests, max_new_tokens):
    """Random specs behind two that arrive first, together, with short
    prompts and the longest outputs: in a pool sized for the largest request
    they cannot both finish, so preemption is certain, not just likely."""
    specs = random_specs(rng, num_requests, max_new_tokens=max_new_tokens)
    longest = max(len(spec.prompt_ids) + spec.max_new_tokens for spec in specs)
    hogs = [RequestSpec(f"hog{i}", tuple(rng.choice(VOCAB) for _ in range(8)), (),
                        rng.randrange(1000), longest, 0) for i in range(2)]
    return hogs + specs


@pytest.mark.parametrize("chunked_prefill_size", [None, 5])
@pytest.mark.parametrize("disable_radix_cache", [False, True])
@pytest.mark.parametrize("enable_mixed_chunk", [True, False])
def test_outputs_survive_preemption(rng, chunked_prefill_size, disable_radix_cache, enable_mixed_chunk):
    specs = contending_specs(rng, 10, max_new_tokens=40)
    page_size = 4
    largest = max(len(spec.prompt_ids) + spec.max_new_tokens for spec in specs)
    num_pages = -(-largest // page_size) + 2  # room for the largest request and a little more
    # No decode reserve (conservativeness 0): admission packs the pool, so decode must preempt.
    result = run_specs(specs, page_size=page_size, num_pages=num_pages,
                       chunked_prefill_size=chunked_prefill_size, disable_radix_cache=disable_radix_cache,
                       schedule_conservativeness=0.0, enable_mixed_chunk=enable_mixed_chunk)
    assert result.scheduler.metrics.num_preemptions > 0
    assert_matches_reference(specs, result)
    for spec in specs:
        assert result.outputs[spec.rid][-1].finish_reason == "length"
    assert_all_pages_back(result)


def test_stream_interval_groups_tokens(rng):
    specs = random_specs(rng, 6, max_new_tokens=30)
    result = run_specs(specs, stream_interval=4)
    for spec in specs:
        sizes = [len(output.new_token_ids) for output in result.outputs[spec.rid]]
        assert all(size == 4 for size in sizes[:-1]), sizes
        assert 1 <= sizes[-1] <= 4 or (sizes[-1] == 0 and len(sizes) > 1)
        assert [output.finished for output in result.outputs[spec.rid]] == [False] * (len(sizes) - 1) + [True]
