"""Images encoded a step ahead of their prefill (vision_encode_ahead): which
waiting request's images a step carries, that its later chunks are not
charged the tower's work, that cached prefixes are not encoded again, and
that the tokens stay the reference's (fake runner)."""

from pyvlm.config import CacheConfig, SchedulerConfig
from pyvlm.scheduling import encode_ahead
from pyvlm.scheduling.request import Request
from pyvlm.scheduling.scheduler import Scheduler
from pyvlm.scheduling.types import MultimodalItem, SamplingParams

from tests.scheduling.fakes import VOCAB, FakeRunner, check_invariants, run_until_idle
from tests.scheduling.test_mixed_steps import assert_reference, drive
from tests.scheduling.workload import IMAGE_TOKEN, random_specs

PAGE = 4


def image_request(rid: str, text_before: int, image_tokens: int = 12, seed: int = 1) -> Request:
    image = MultimodalItem(hash(rid) & (2**60 - 1), text_before, image_tokens)
    prompt = VOCAB[:text_before] + [IMAGE_TOKEN] * image_tokens + VOCAB[:2]
    return Request(rid, prompt, SamplingParams(max_new_tokens=3), [image], seed=seed)


def scheduler_with_a_stream(ahead: bool, runner: FakeRunner) -> Scheduler:
    config = SchedulerConfig(chunked_prefill_size=64, max_mixed_prefill_tokens=20,
                             vision_encode_ahead=ahead)
    scheduler = Scheduler(config, CacheConfig(page_size=PAGE), 512, 100000)
    chat = Request("chat", [11, 12, 13], SamplingParams(max_new_tokens=40), seed=1)
    scheduler.add_request(runner.register(chat))
    scheduler.step(runner)  # chat decodes from now on
    return scheduler


def test_a_step_encodes_the_next_waiting_requests_images_and_their_chunks_are_not_charged():
    """A decoding request, then a, b and c with 12-token images, a mixed cap
    of 20 (as test_mixed_steps' test without encode-ahead, where b's first
    chunk waits until the third step). Step 1 admits a, charged its tower,
    and encodes b's image; step 2 runs a's rest and 11 tokens of b, not
    charged, and encodes c's; step 3 b's last 3 and all 16 of c."""
    runner = FakeRunner(PAGE, 512)
    scheduler = scheduler_with_a_stream(True, runner)
    requests = [image_request("a", 3), image_request("b", 0, seed=2), image_request("c", 2, seed=3)]
    for request in requests:
        scheduler.add_request(runner.register(request))
    steps, ahead = [], []
    for _ in range(3):
        scheduler.step(runner)
        batch = runner.batches[-1]
        steps.append({c.rid: c.num_new_tokens for c in batch.chunks if c.rid != "chat"})
        ahead.append(batch.encode_ahead)
    assert steps == [{"a": 8}, {"a": 9, "b": 11}, {"a": 1, "b": 3, "c": 16}]
    assert ahead == [requests[1].mm_items, requests[2].mm_items, []]
    assert all(r.encoded_ahead for r in requests[1:]) and not requests[0].encoded_ahead
    run_until_idle(scheduler, runner)
    check_invariants(scheduler)


def test_no_step_carries_images_unless_asked():
    runner = FakeRunner(PAGE, 512)
    scheduler = scheduler_with_a_stream(False, runner)
    for rid in "ab":
        scheduler.add_request(runner.register(image_request(rid, 2)))
    run_until_idle(scheduler, runner)
    assert all(batch.encode_ahead == [] for batch in runner.batches)


def test_at_most_two_waiting_requests_are_encoded_ahead_and_text_prompts_are_skipped():
    waiting = [Request("text", [1, 2, 3])] + [image_request(rid, 1) for rid in "abc"]
    picks = [encode_ahead.pick_encode_ahead(waiting, lambda r: r.mm_items) for _ in range(4)]
    assert picks == [waiting[1].mm_items, waiting[2].mm_items, [], []]
    assert not waiting[3].encoded_ahead
    waiting.pop(1)  # a is admitted: c is now among the first two
    assert encode_ahead.pick_encode_ahead(waiting, lambda r: r.mm_items) == waiting[2].mm_items


def test_an_image_under_a_cached_prefix_is_not_encoded_ahead():
    """The same image prompt twice: once the first has run, the second's
    image lies in its cached prefix, so when it waits behind a request that
    fills the step, the step carries no image for it."""
    runner = FakeRunner(PAGE, 512)
    scheduler = scheduler_with_a_stream(True, runner)
    first = image_request("first", 4)
    scheduler.add_request(runner.register(first))
    while first.finish_reason is None:
        scheduler.step(runner)
    again = image_request("first", 4)
    again.rid = "again"
    blocker = image_request("blocker", 0, image_tokens=40)  # a step of its own
    for request in (blocker, again):
        scheduler.add_request(runner.register(request))
    scheduler.step(runner)
    assert {c.rid for c in runner.batches[-1].chunks} == {"chat", "blocker"}
    assert again.encoded_ahead and runner.batches[-1].encode_ahead == []
    run_until_idle(scheduler, runner)
    check_invariants(scheduler)


def test_random_workloads_keep_the_reference_tokens(rng):
    specs = random_specs(rng, 24)
    outputs, runner = drive(specs, lambda before, batch, config: None, chunked_prefill_size=16,
                            max_prefill_tokens=64, max_mixed_prefill_tokens=24,
                            vision_encode_ahead=True)
    assert any(batch.encode_ahead for batch in runner.batches)
    assert_reference(specs, outputs)
