"""Mixed steps (SGLang's mixed chunk): prefill chunks run in the same step
as one decode token of every running request, the decodes counted against
the prefill budget; the decodes' pages come first, and when only
preemption could give them the step does not mix. The fake runner checks
every position's KV slot on every step, decodes in mixed steps included."""

from collections import defaultdict

import pytest

from pyvlm.config import CacheConfig, SchedulerConfig
from pyvlm.scheduling.encoder_budget import tower_charge
from pyvlm.scheduling.request import Request
from pyvlm.scheduling.scheduler import Scheduler
from pyvlm.scheduling.types import MultimodalItem, SamplingParams

from tests.scheduling.fakes import VOCAB, FakeRunner, check_invariants, reference_generate, stage_of
from tests.scheduling.workload import IMAGE_TOKEN, random_specs

PAGE = 4


class Before:
    """What a step starts from: the running requests, their computed
    tokens, and whether their decode pages can be had without preemption."""

    def __init__(self, scheduler: Scheduler):
        kv = scheduler.kv
        self.scheduler, self.num_preemptions = scheduler, scheduler.metrics.num_preemptions
        self.computed = {r.rid: r.num_computed_tokens for r in scheduler.running}
        # a decode token past the request's pages needs a new one
        num_needy = sum(kv.num_pages_for(r.num_computed_tokens + 1) > len(r.page_table)
                        for r in scheduler.running)
        self.has_decode_pages = num_needy <= kv.allocator.num_free + kv.num_evictable_pages


def drive(specs, check_step, num_pages=4096, images_ready=None, **sched_args):
    """Runs the specs (each added at its arrival step), calling
    check_step(before, batch or None, config) after every step; returns
    each rid's output ids and the runner. images_ready: the scheduler's hook
    (a tower beside the steps), if any."""
    config = SchedulerConfig(**sched_args)
    runner = FakeRunner(PAGE, num_pages)
    scheduler = Scheduler(config, CacheConfig(page_size=PAGE), num_pages, 100000,
                          images_ready=images_ready)
    pending = sorted(specs, key=lambda spec: spec.arrival_step)
    outputs, step = defaultdict(list), 0
    while pending or scheduler.has_work():
        while pending and pending[0].arrival_step <= step:
            scheduler.add_request(runner.register(pending.pop(0).build()))
        before, num_batches = Before(scheduler), len(runner.batches)
        for output in scheduler.step(runner):
            outputs[output.rid].extend(output.new_token_ids)
        check_invariants(scheduler)
        check_step(before, runner.batches[-1] if len(runner.batches) > num_batches else None, config)
        step += 1
        assert step < 20000, "scheduler did not finish"
    return outputs, runner


def decode_chunks(batch):
    return [chunk for chunk in batch.chunks if stage_of(chunk) == "decode"]


def can_mix(before: Before, config: SchedulerConfig) -> bool:
    """The budget rule: the decode tokens must leave room for prefill."""
    num_running = len(before.computed)
    chunk = config.chunked_prefill_size
    return (0 < num_running < config.max_prefill_tokens
            and (chunk is None or chunk <= 0 or num_running < chunk))


class MixChecks:
    """The rules every step obeys (module docstring), and counts of what happened."""

    def __init__(self):
        self.num_mixed = self.num_fallbacks = 0

    def __call__(self, before, batch, config):
        if batch is None:
            return
        # a running request's chunk is its decode; every other chunk is prefill
        decodes = [chunk for chunk in batch.chunks if chunk.rid in before.computed]
        prefills = [chunk for chunk in batch.chunks if chunk.rid not in before.computed]
        assert all(c.num_new_tokens == 1 and c.sample for c in decodes)
        assert batch.chunks == prefills + decodes, "prefill chunks come first"
        assert batch.is_decode == (not prefills)
        num_tokens = sum(chunk.num_new_tokens for chunk in batch.chunks)
        if prefills and decodes:
            self.num_mixed += 1
            self._check_budget(config, num_tokens, len(prefills),
                               sum(chunk.num_new_tokens for chunk in prefills))
        if not config.enable_mixed_chunk or not can_mix(before, config):
            assert batch.is_decode or not decodes, "a step mixed that must not"
        elif before.has_decode_pages:
            # every running request decodes, at its next position
            assert {c.rid: c.start_pos for c in decodes} == before.computed
        else:  # today's rule: prefill alone, or decode alone after a preemption
            self.num_fallbacks += 1
            assert batch.is_decode or not decodes, "decodes mixed in without their pages"
            assert not batch.is_decode or len(decodes) < len(before.computed) \
                or before.scheduler.metrics.num_preemptions > before.num_preemptions

    @staticmethod
    def _check_budget(config, num_tokens, num_prefills, num_prefill_tokens):
        chunk = config.chunked_prefill_size
        if chunk is not None and chunk > 0:
            assert num_tokens <= min(chunk, config.max_prefill_tokens)
        else:
            assert num_tokens <= config.max_prefill_tokens or num_prefills == 1
        cap = config.max_mixed_prefill_tokens
        if cap and cap > 0:
            assert num_prefill_tokens <= cap or (num_prefills == 1 and not chunk), \
                "a mixed step took more prefill than max_mixed_prefill_tokens"


def assert_reference(specs, outputs):
    for spec in specs:
        assert outputs[spec.rid] == spec.reference(), spec.rid


@pytest.mark.parametrize("chunked_prefill_size, max_prefill_tokens", [(8, 64), (16, 12), (None, 24)])
def test_mixed_steps_carry_every_decode_within_the_budget(rng, chunked_prefill_size, max_prefill_tokens):
    specs = random_specs(rng, 24, max_new_tokens=30)
    checks = MixChecks()
    outputs, _ = drive(specs, checks, chunked_prefill_size=chunked_prefill_size,
                       max_prefill_tokens=max_prefill_tokens)
    assert checks.num_mixed > 0
    assert_reference(specs, outputs)


@pytest.mark.parametrize("chunked_prefill_size", [None, 64])
def test_mixed_steps_take_at_most_the_mixed_prefill_cap(rng, chunked_prefill_size):
    """A cap of 5 prefill tokens while requests decode: mixed steps stay
    under it (a lone whole prompt excepted when chunking is off), steps
    without decodes still take the full budget, outputs stay exact."""
    specs = random_specs(rng, 24, max_new_tokens=30)
    checks = MixChecks()
    big_steps = []

    def check(before, batch, config):
        checks(before, batch, config)
        if batch is not None and not before.computed:
            big_steps.append(sum(c.num_new_tokens for c in batch.chunks))

    outputs, _ = drive(specs, check, chunked_prefill_size=chunked_prefill_size,
                       max_prefill_tokens=64, max_mixed_prefill_tokens=5)
    assert checks.num_mixed > 0
    assert max(big_steps) > 5  # the cap applies only while requests decode
    assert_reference(specs, outputs)


@pytest.mark.parametrize("chunked_prefill_size", [None, 6])
def test_without_decode_pages_a_step_does_not_mix(rng, chunked_prefill_size):
    """A pool that holds about two requests (no decode reserve, so
    admission packs it): steps whose decodes would need preemption run
    prefill alone, or decode alone after preempting; outputs stay exact."""
    specs = random_specs(rng, 16, max_new_tokens=40)
    largest = max(len(spec.prompt_ids) + spec.max_new_tokens for spec in specs)
    checks = MixChecks()
    outputs, _ = drive(specs, checks, num_pages=-(-largest // PAGE) + 3,
                       chunked_prefill_size=chunked_prefill_size, schedule_conservativeness=0.0)
    assert_reference(specs, outputs)
    assert checks.num_mixed > 0 and checks.num_fallbacks > 0


def stream_scenario(enable_mixed_chunk: bool):
    """A running request ("chat") while a 120-token prompt ("long")
    arrives and is prefilled in chunks of 16: chat's new tokens per step
    until long has sampled its first token."""
    runner = FakeRunner(PAGE, 512)
    config = SchedulerConfig(chunked_prefill_size=16, enable_mixed_chunk=enable_mixed_chunk)
    scheduler = Scheduler(config, CacheConfig(page_size=PAGE), 512, 100000)
    chat = Request("chat", [11, 12, 13], SamplingParams(max_new_tokens=40), seed=1)
    long = Request("long", [VOCAB[i % len(VOCAB)] for i in range(120)],
                   SamplingParams(max_new_tokens=4), seed=2)
    scheduler.add_request(runner.register(chat))
    scheduler.step(runner)  # chat's prefill: chat is running
    scheduler.add_request(runner.register(long))
    per_step = []
    while not long.output_ids:
        before = len(chat.output_ids)
        scheduler.step(runner)
        check_invariants(scheduler)
        per_step.append(len(chat.output_ids) - before)
    while scheduler.has_work():
        scheduler.step(runner)
    assert chat.output_ids == reference_generate(chat.prompt_ids, [], 1, 40)
    assert long.output_ids == reference_generate(long.prompt_ids, [], 2, 4)
    return per_step


def test_a_stream_gets_a_token_every_step_while_a_long_prompt_prefills():
    # 15 prompt tokens a step (16 less chat's decode): 8 steps for 120 tokens
    assert stream_scenario(enable_mixed_chunk=True) == [1] * 8


def test_with_mixing_off_prefill_steps_pause_the_streams():
    """The old behaviour: a step is prefill alone (8 chunks of 16 tokens,
    the stream waits) or decode alone; no batch holds both."""
    assert stream_scenario(enable_mixed_chunk=False) == [0] * 8


def test_with_mixing_off_no_batch_mixes(rng):
    specs = random_specs(rng, 16)
    checks = MixChecks()
    outputs, runner = drive(specs, checks, chunked_prefill_size=8, enable_mixed_chunk=False)
    assert checks.num_mixed == 0
    assert all(batch.is_decode or not decode_chunks(batch) for batch in runner.batches)
    assert_reference(specs, outputs)


def test_decodes_that_fill_the_chunk_budget_leave_prefill_its_own_steps():
    """With as many running requests as the chunk size, mixing would leave
    prefill no budget (SGLang starves it); the step is prefill alone, so an
    arrival is served before the running requests finish."""
    runner = FakeRunner(PAGE, 1024)
    scheduler = Scheduler(SchedulerConfig(chunked_prefill_size=4), CacheConfig(page_size=PAGE),
                          1024, 100000)
    running = [Request(f"r{i}", [20 + i], SamplingParams(max_new_tokens=50), seed=i) for i in range(4)]
    for request in running:
        scheduler.add_request(runner.register(request))
    while len(scheduler.running) < 4:
        scheduler.step(runner)
    late = Request("late", [30, 31, 32], SamplingParams(max_new_tokens=2), seed=9)
    scheduler.add_request(runner.register(late))
    scheduler.step(runner)
    assert [c.rid for c in runner.batches[-1].chunks] == ["late"]
    while scheduler.has_work():
        scheduler.step(runner)
    assert late.output_ids == reference_generate(late.prompt_ids, [], 9, 2)


def test_the_prefill_log_counts_the_decodes_it_ran_with(caplog):
    runner = FakeRunner(PAGE, 64)
    scheduler = Scheduler(SchedulerConfig(), CacheConfig(page_size=PAGE), 64, 1000)
    for rid in ("a", "b"):
        scheduler.add_request(runner.register(Request(rid, [11, 12], SamplingParams(max_new_tokens=4))))
        scheduler.step(runner)
    with caplog.at_level("INFO", logger="pyvlm.engine"):
        scheduler.add_request(runner.register(Request("c", [13, 14, 15], SamplingParams(max_new_tokens=4))))
        scheduler.step(runner)
    assert len(runner.batches[-1].chunks) == 3  # c's prefill, a's and b's decodes
    assert "#new-seq: 1, #new-token: 3," in caplog.records[-1].getMessage()
    assert "#running-req: 2," in caplog.records[-1].getMessage()


def test_the_server_flag_turns_mixing_off():
    import argparse

    from pyvlm.config import engine_config
    from pyvlm.server.args import add_server_arguments, server_args_from

    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    for flags, enabled in (([], True), (["--disable-mixed-chunk"], False)):
        kwargs = server_args_from(parser.parse_args(flags)).engine_kwargs()
        assert engine_config(**kwargs).scheduler.enable_mixed_chunk is enabled


@pytest.mark.parametrize("chunked_prefill_size", [5, 7])
def test_a_mixed_step_pays_for_the_images_it_starts(rng, chunked_prefill_size):
    """While requests decode, a step's prefill chunks plus the tower work
    of the images they start stay within the mixed cap, unless the step
    holds one prefill chunk (it must progress); images still get started
    (the cap delays them, never forever) and outputs stay exact."""
    specs = random_specs(rng, 24, max_new_tokens=30)
    cap = 12
    checks = MixChecks()
    charged_steps = []

    def check(before, batch, config):
        checks(before, batch, config)
        if batch is None or batch.is_decode:
            return
        prefills = [c for c in batch.chunks if c.rid not in before.computed]
        if len(prefills) == len(batch.chunks):
            return  # no decode in this step: the cap is not its budget
        charge = sum(c.num_new_tokens + tower_charge(c.mm_items, c.start_pos,
                                                     c.start_pos + c.num_new_tokens)
                     for c in prefills)
        assert charge <= cap or len(prefills) == 1, (charge, prefills)
        charged_steps.append(charge > sum(c.num_new_tokens for c in prefills))

    outputs, _ = drive(specs, check, chunked_prefill_size=chunked_prefill_size,
                       max_prefill_tokens=64, max_mixed_prefill_tokens=cap)
    assert any(charged_steps)  # some mixed steps started an image
    assert_reference(specs, outputs)


def test_a_mixed_step_does_not_start_an_image_it_cannot_pay_for():
    """A decoding request, then two arrivals that start with images of 12
    tokens, a mixed cap of 20: a's first chunk holds its 3 text tokens and
    5 of its image's (8, plus the tower's 12); the next step a's other 9
    and nothing of b (b's tower alone is more than the 11 left); then b's
    first 8 tokens with its tower, then its last 6."""
    runner = FakeRunner(PAGE, 512)
    config = SchedulerConfig(chunked_prefill_size=64, max_mixed_prefill_tokens=20)
    scheduler = Scheduler(config, CacheConfig(page_size=PAGE), 512, 100000)
    chat = Request("chat", [11, 12, 13], SamplingParams(max_new_tokens=40), seed=1)
    scheduler.add_request(runner.register(chat))
    scheduler.step(runner)  # chat decodes from now on
    images = {}
    for rid, text_before in (("a", 3), ("b", 0)):
        image = MultimodalItem(hash(rid) & (2**60 - 1), text_before, 12)
        prompt = VOCAB[:text_before] + [IMAGE_TOKEN] * 12 + VOCAB[:2]
        images[rid] = image
        scheduler.add_request(runner.register(Request(
            rid, prompt, SamplingParams(max_new_tokens=3), [image], seed=len(rid))))
    steps = []
    for _ in range(4):
        scheduler.step(runner)
        steps.append({c.rid: c.num_new_tokens for c in runner.batches[-1].chunks})
    assert steps == [{"chat": 1, "a": 8}, {"chat": 1, "a": 9},
                     {"chat": 1, "a": 1, "b": 8}, {"chat": 1, "a": 1, "b": 6}]
    while scheduler.has_work():
        scheduler.step(runner)
    check_invariants(scheduler)
