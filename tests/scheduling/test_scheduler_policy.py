"""Scheduling policy, batch limits, aborts, context length and logs."""

import logging
import re

import pytest

from pyvlm.config import CacheConfig, SchedulerConfig
from pyvlm.scheduling.request import Request, RequestStatus
from pyvlm.scheduling.scheduler import Scheduler
from pyvlm.scheduling.types import SamplingParams

from tests.scheduling.fakes import (VOCAB, FakeRunner, check_invariants, joined_ids, reference_generate,
                                    run_until_idle, stage_of)
from tests.scheduling.workload import random_specs, run_specs


def make_scheduler(page_size=4, num_pages=256, context_length=4096, **sched_args):
    runner = FakeRunner(page_size, num_pages)
    scheduler = Scheduler(SchedulerConfig(**sched_args), CacheConfig(page_size=page_size), num_pages,
                          context_length)
    return scheduler, runner


def add(scheduler, runner, rid, prompt, max_new_tokens=8, seed=0):
    request = Request(rid, list(prompt), SamplingParams(max_new_tokens=max_new_tokens), seed=seed)
    scheduler.add_request(runner.register(request))
    return request


def random_prompt(rng, length):
    return [rng.choice(VOCAB) for _ in range(length)]


@pytest.mark.parametrize("policy, first", [("lpm", "cached"), ("fcfs", "unrelated")])
def test_schedule_policy_order(rng, policy, first):
    scheduler, runner = make_scheduler(max_running_requests=1, schedule_policy=policy)
    shared = random_prompt(rng, 16)
    add(scheduler, runner, "warm", shared + random_prompt(rng, 3))
    run_until_idle(scheduler, runner)
    add(scheduler, runner, "unrelated", random_prompt(rng, 10))
    add(scheduler, runner, "cached", shared + random_prompt(rng, 5))
    scheduler.step(runner)
    assert [chunk.rid for chunk in runner.batches[-1].chunks] == [first]


def test_identical_prompt_recomputes_only_its_last_page(rng):
    scheduler, runner = make_scheduler(page_size=4)
    prompt = random_prompt(rng, 16)  # exactly four pages
    outputs = {}
    for rid in ("a", "b"):
        add(scheduler, runner, rid, prompt, seed=7)
        outputs.update(run_until_idle(scheduler, runner))
    assert outputs["b"][-1].cached_tokens == 12
    assert runner.batches[-8].chunks[0].start_pos == 12  # b's prefill (then 7 decode steps)
    assert joined_ids(outputs["a"]) == joined_ids(outputs["b"]) == reference_generate(prompt, [], 7, 8)


@pytest.mark.parametrize("chunked_prefill_size", [None, 8])
def test_batch_limits(rng, chunked_prefill_size):
    specs = random_specs(rng, 14)
    result = run_specs(specs, max_running_requests=3, max_prefill_tokens=20,
                       chunked_prefill_size=chunked_prefill_size)
    assert result.max_running_seen <= 3
    for batch in result.runner.batches:
        # mixed-in decodes count against both budgets (SGLang's rule)
        num_tokens = sum(chunk.num_new_tokens for chunk in batch.chunks)
        num_prefills = sum(stage_of(chunk) == "prefill" for chunk in batch.chunks)
        assert len(batch.chunks) <= 3
        if batch.is_decode:
            continue
        if chunked_prefill_size:
            assert num_tokens <= 8
            assert sum(not chunk.sample for chunk in batch.chunks) <= 1  # one request mid-chunk
        else:
            assert num_tokens <= 20 or num_prefills == 1  # a first prompt runs however long
    assert any(not chunk.sample for batch in result.runner.batches for chunk in batch.chunks) == bool(chunked_prefill_size)
    for spec in specs:
        assert result.output_ids[spec.rid] == spec.reference()


def assert_idle_and_clean(scheduler, runner):
    run_until_idle(scheduler, runner)
    assert scheduler.kv.cache.num_protected_pages == 0
    assert scheduler.kv.allocator.num_used == scheduler.kv.cache.num_pages
    assert scheduler.flush_cache() and scheduler.kv.allocator.num_used == 0


def abort_and_check(scheduler, request):
    output = scheduler.abort(request.rid)
    assert output.finished and output.finish_reason == "abort"
    assert output.completion_tokens == len(request.output_ids)
    assert request.page_table == [] and request.status is RequestStatus.FINISHED
    assert scheduler.abort(request.rid) is None
    check_invariants(scheduler)


def test_abort_waiting_and_mid_chunk(rng):
    scheduler, runner = make_scheduler(max_running_requests=1, chunked_prefill_size=4)
    long = add(scheduler, runner, "long", random_prompt(rng, 30))
    queued = add(scheduler, runner, "queued", random_prompt(rng, 5))
    scheduler.step(runner)
    assert scheduler.chunked is long and long.page_table
    abort_and_check(scheduler, queued)
    abort_and_check(scheduler, long)
    assert scheduler.chunked is None and not scheduler.has_work()
    assert_idle_and_clean(scheduler, runner)


def test_abort_running_and_preempted(rng):
    # One request needs up to 19 pages; no decode reserve, so all three are admitted and preempt.
    scheduler, runner = make_scheduler(page_size=2, num_pages=24, schedule_conservativeness=0.0)
    requests = [add(scheduler, runner, f"r{i}", random_prompt(rng, 8), max_new_tokens=30) for i in range(3)]
    while not any(r.num_preemptions and r.status is RequestStatus.WAITING for r in requests):
        scheduler.step(runner)
        check_invariants(scheduler)
    preempted = next(r for r in requests if r.status is RequestStatus.WAITING)
    running = next(r for r in requests if r in scheduler.running)
    abort_and_check(scheduler, preempted)
    abort_and_check(scheduler, running)
    survivor = next(r for r in requests if r not in (preempted, running))
    assert_idle_and_clean(scheduler, runner)
    assert survivor.output_ids == reference_generate(survivor.prompt_ids, [], 0, 30)


def test_context_length_refusal_and_clipping(rng):
    scheduler, runner = make_scheduler(context_length=32)
    with pytest.raises(ValueError, match=re.escape(
            "The prompt has 32 tokens (after image expansion), which exceeds the context length of 32 tokens")):
        add(scheduler, runner, "too-long", random_prompt(rng, 32))
    request = add(scheduler, runner, "fits", random_prompt(rng, 20), max_new_tokens=100)
    outputs = run_until_idle(scheduler, runner)["fits"]
    assert len(request.output_ids) == 12 and outputs[-1].finish_reason == "length"


def test_log_lines(rng, caplog):
    scheduler, runner = make_scheduler(decode_log_interval=2)
    add(scheduler, runner, "a", random_prompt(rng, 10), max_new_tokens=6)
    with caplog.at_level(logging.INFO, logger="pyvlm.engine"):
        run_until_idle(scheduler, runner)
    lines = [record.getMessage() for record in caplog.records]
    # #running-req: what ran before the batch (SGLang's), not the request it admits
    assert lines[0] == ("Prefill batch. #new-seq: 1, #new-token: 10, #cached-token: 0, cache hit rate: 0.00%, "
                        "token usage: 0.01, #running-req: 0, #queue-req: 0")
    decode = re.compile(r"Decode batch\. #running-req: 1, #token: \d+, token usage: 0\.\d\d, "
                        r"gen throughput \(token/s\): \d+\.\d\d, #queue-req: 0$")
    assert len(lines) == 3 and all(decode.match(line) for line in lines[1:])  # 5 decode steps, every 2nd logged


def test_stats(rng):
    scheduler, runner = make_scheduler(max_running_requests=1)
    prompt = random_prompt(rng, 12)
    add(scheduler, runner, "a", prompt)
    add(scheduler, runner, "b", prompt)
    scheduler.step(runner)
    stats = scheduler.stats()
    assert stats["num_running_reqs"] == 1 and stats["num_queued_reqs"] == 1
    assert stats["token_usage"] == pytest.approx(scheduler.kv.num_used_pages / 256)
    assert not scheduler.flush_cache()  # busy
    run_until_idle(scheduler, runner)
    assert scheduler.stats()["cache_hit_rate"] == pytest.approx(8 / 24)  # b reused two of its three pages


def test_request_outgrowing_the_pool_finishes_with_length(rng):
    scheduler, runner = make_scheduler(page_size=4, num_pages=5)  # 20 tokens of KV
    prompt = random_prompt(rng, 10)
    request = add(scheduler, runner, "big", prompt, max_new_tokens=30)
    outputs = run_until_idle(scheduler, runner)["big"]
    assert outputs[-1].finish_reason == "length"
    assert request.output_ids == reference_generate(prompt, [], 0, 30)[:len(request.output_ids)]
    assert len(prompt) + len(request.output_ids) == 21  # the 21st token's KV would need a sixth page
    assert scheduler.kv.cache.num_protected_pages == 0
