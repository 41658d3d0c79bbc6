"""Images encoded a step ahead of their prefill (vision_encode_ahead): which
waiting request's images a step carries, in what its budget leaves; that
the request's chunks are then not charged the tower's work; that cached
prefixes are not encoded again; that with a tower beside the steps (the
images_ready hook) a request waits for its images while others run, and
is admitted at once when nothing else does; and that the tokens stay the
reference's (fake runner)."""

from pyvlm.config import CacheConfig, SchedulerConfig
from pyvlm.scheduling import encode_ahead
from pyvlm.scheduling.encoder_budget import tower_charge, tower_work
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


def scheduler_with_a_stream(ahead: bool, runner: FakeRunner, images_ready=None,
                            **config) -> Scheduler:
    config = SchedulerConfig(chunked_prefill_size=64, max_mixed_prefill_tokens=20,
                             vision_encode_ahead=ahead, **config)
    scheduler = Scheduler(config, CacheConfig(page_size=PAGE), 512, 100000,
                          images_ready=images_ready)
    chat = Request("chat", [11, 12, 13], SamplingParams(max_new_tokens=40), seed=1)
    scheduler.add_request(runner.register(chat))
    scheduler.step(runner)  # chat decodes from now on
    return scheduler


def test_a_step_encodes_the_next_waiting_requests_images_in_what_its_budget_leaves():
    """A decoding request, then a, b, c and d with 5-token images, a mixed
    cap of 20. Step 1 admits a whole (10 tokens, 5 charged for its tower)
    and spends the 5 left on encoding b's image; step 2 runs b's 7 tokens,
    no longer charged, and 8 of c's with its tower (without encoding ahead
    only 3 of c's fit); step 3 the rest. No step's work exceeds the cap."""
    runner = FakeRunner(PAGE, 512)
    scheduler = scheduler_with_a_stream(True, runner)
    requests = [image_request(rid, before, 5, seed)
                for seed, (rid, before) in enumerate(zip("abcd", (3, 0, 2, 1)))]
    for request in requests:
        scheduler.add_request(runner.register(request))
    steps, ahead = [], []
    for _ in range(3):
        charged = {r.rid for r in requests if not r.encoded_ahead}
        scheduler.step(runner)
        batch = runner.batches[-1]
        prefills = [c for c in batch.chunks if c.rid != "chat" and not c.is_generated_token]
        work = sum(c.num_new_tokens for c in prefills)
        work += sum(tower_charge(c.mm_items, c.start_pos, c.start_pos + c.num_new_tokens)
                    for c in prefills if c.rid in charged)
        assert work + tower_work(batch.encode_ahead) <= 20
        steps.append({c.rid: c.num_new_tokens for c in prefills})
        ahead.append(batch.encode_ahead)
    assert steps == [{"a": 10}, {"b": 7, "c": 8}, {"c": 1, "d": 8}]
    assert ahead == [requests[1].mm_items, [], []]
    assert [r.encoded_ahead for r in requests] == [False, True, False, False]
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
    picks = [encode_ahead.pick_encode_ahead(waiting, lambda r: r.mm_items, 100)
             for _ in range(4)]
    assert picks == [waiting[1].mm_items, waiting[2].mm_items, [], []]
    assert not waiting[3].encoded_ahead
    waiting.pop(1)  # a is admitted: c is now among the first two
    assert encode_ahead.pick_encode_ahead(waiting, lambda r: r.mm_items, 12) == waiting[2].mm_items


def test_images_whose_charge_does_not_fit_wait_for_a_later_step():
    waiting = [image_request("a", 1)]  # 12 image tokens
    assert encode_ahead.pick_encode_ahead(waiting, lambda r: r.mm_items, 11) == []
    assert not waiting[0].encoded_ahead
    assert encode_ahead.pick_encode_ahead(waiting, lambda r: r.mm_items, 12) == waiting[0].mm_items


def test_an_image_under_a_cached_prefix_is_not_encoded_ahead():
    """The same image prompt twice: once the first has run, the second's
    image lies in its cached prefix; while it waits for a running slot, the
    steps carry no image for it."""
    runner = FakeRunner(PAGE, 512)
    scheduler = scheduler_with_a_stream(True, runner, max_running_requests=2)
    first = image_request("first", 4)
    scheduler.add_request(runner.register(first))
    while first.finish_reason is None:
        scheduler.step(runner)
    again = image_request("first", 4)
    again.rid = "again"
    talker = Request("talker", [11, 12], SamplingParams(max_new_tokens=6), seed=5)
    for request in (talker, again):
        scheduler.add_request(runner.register(request))
    scheduler.step(runner)
    assert {c.rid for c in runner.batches[-1].chunks} == {"chat", "talker"}  # no slot for again
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


class Tower:
    """The images_ready hook of a fake tower beside the steps: the images
    whose encoding is done are those in `done`; `asked` records each look."""

    def __init__(self):
        self.done, self.asked = set(), []

    def __call__(self, items):
        self.asked.append([item.hash for item in items])
        return all(item.hash in self.done for item in items)


def prefill_rids(batch):
    return {c.rid for c in batch.chunks if not c.is_generated_token}


def test_beside_the_steps_a_request_is_admitted_once_its_images_are_done():
    """A decoding request, then an image prompt. Step 1 starts its tower
    (encode_ahead) and does not admit it; steps go on decoding while the
    tower runs; the first step planned after it is done admits the
    prompt, its chunk charged no tower work."""
    runner, tower = FakeRunner(PAGE, 512), Tower()
    scheduler = scheduler_with_a_stream(True, runner, tower)
    request = image_request("a", 3)
    scheduler.add_request(runner.register(request))
    scheduler.step(runner)
    assert runner.batches[-1].encode_ahead == request.mm_items
    assert prefill_rids(runner.batches[-1]) == set() and request.encoded_ahead
    for _ in range(3):
        scheduler.step(runner)
        assert prefill_rids(runner.batches[-1]) == set()
        assert runner.batches[-1].encode_ahead == []  # started once
    assert tower.asked[-1] == [request.mm_items[0].hash]
    tower.done.add(request.mm_items[0].hash)
    scheduler.step(runner)
    chunk, = [c for c in runner.batches[-1].chunks if c.rid == "a"]
    assert chunk.num_new_tokens == len(request.prompt_ids)  # 17 of a cap of 20: no tower charged
    run_until_idle(scheduler, runner)
    check_invariants(scheduler)


def test_beside_the_steps_an_idle_scheduler_admits_an_image_prompt_at_once():
    """Nothing else to run: the request's own step encodes its images (the
    idle server's time to first token waits for nothing)."""
    runner, tower = FakeRunner(PAGE, 512), Tower()
    config = SchedulerConfig(chunked_prefill_size=64, vision_encode_ahead=True)
    scheduler = Scheduler(config, CacheConfig(page_size=PAGE), 512, 100000, images_ready=tower)
    first, second = image_request("a", 2), image_request("b", 1)
    for request in (first, second):
        scheduler.add_request(runner.register(request))
    scheduler.step(runner)
    assert prefill_rids(runner.batches[-1]) == {"a"}  # b waits: a now runs beside it
    assert runner.batches[-1].encode_ahead == second.mm_items
    assert not first.encoded_ahead


def test_beside_the_steps_the_tower_is_not_charged_to_the_step():
    """An image larger than the mixed-step cap (30 tokens, cap 20) is still
    encoded ahead: its tower is not the step's work."""
    runner = FakeRunner(PAGE, 512)
    scheduler = scheduler_with_a_stream(True, runner, Tower())
    request = image_request("big", 1, image_tokens=30)
    scheduler.add_request(runner.register(request))
    scheduler.step(runner)
    assert runner.batches[-1].encode_ahead == request.mm_items


def test_without_encoding_ahead_the_hook_is_never_asked():
    runner, tower = FakeRunner(PAGE, 512), Tower()
    scheduler = scheduler_with_a_stream(False, runner, tower)
    scheduler.add_request(runner.register(image_request("a", 2)))
    run_until_idle(scheduler, runner)
    assert tower.asked == [] and all(b.encode_ahead == [] for b in runner.batches)


def test_beside_the_steps_random_workloads_keep_the_reference_tokens(rng):
    """Towers that finish after a random number of looks: every request is
    admitted in the end and the tokens are the reference's."""
    specs = random_specs(rng, 24)
    answers = []

    def images_ready(items):
        answers.append(rng.random() < 0.4)
        return answers[-1]

    outputs, runner = drive(specs, lambda before, batch, config: None, chunked_prefill_size=16,
                            max_prefill_tokens=64, max_mixed_prefill_tokens=24,
                            vision_encode_ahead=True, images_ready=images_ready)
    assert any(batch.encode_ahead for batch in runner.batches)
    assert True in answers and False in answers  # requests waited, and were then admitted
    assert_reference(specs, outputs)
