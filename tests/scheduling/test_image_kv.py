"""Image cross-attention K/V pages (Llama-3.2-Vision) in the scheduler:
allocated at admission, written once, shared by requests and radix nodes
holding the same image, never shared between different images, freed by
finish, abort, failure and preemption, and restored after preemption. A
fake runner keeps which image each page holds and checks every read."""

import random

import pytest

from pyvlm.config import CacheConfig, SchedulerConfig
from pyvlm.scheduling.image_kv import ImageKVTable
from pyvlm.scheduling.page_allocator import PageAllocator
from pyvlm.scheduling.request import Request
from pyvlm.scheduling.scheduler import Scheduler
from pyvlm.scheduling.types import MultimodalItem, SamplingParams

from tests.scheduling.fakes import IMAGE_TOKEN, VOCAB, FakeRunner, check_invariants, run_until_idle
from tests.scheduling.workload import RequestSpec, run_specs

ROWS_PER_PAGE = 6


class FakeCrossRunner(FakeRunner):
    """FakeRunner plus the image pages: a write stores the image's hash in
    each of its pages; every step that lists an image checks its pages
    still hold it (a page handed to text or another image fails)."""

    image_rows_per_page = ROWS_PER_PAGE

    def __init__(self, page_size: int, num_pages: int):
        super().__init__(page_size, num_pages)
        self.image_pages = {}
        self.num_image_writes = 0

    def forward(self, batch):
        for chunk in batch.chunks:
            self._write_images(chunk)
        for chunk in batch.chunks:
            self._check_cross_images(chunk)
        results = super().forward(batch)
        for chunk in batch.chunks:
            end = chunk.start_pos + chunk.num_new_tokens
            for position in range(chunk.start_pos, end):
                self.image_pages.pop(chunk.page_table[position // self.page_size], None)
        return results

    def _write_images(self, chunk):
        for image in chunk.cross_images:
            if image.needs_write:
                assert len(image.pages) == -(-image.item.num_cross_rows // ROWS_PER_PAGE)
                self.num_image_writes += 1
                for page in image.pages:
                    self.image_pages[page] = image.item.hash

    def _check_cross_images(self, chunk):
        wanted = [item.hash for item in self.images[chunk.rid] if item.num_cross_rows]
        assert [image.item.hash for image in chunk.cross_images] == wanted
        for image in chunk.cross_images:
            for page in image.pages:
                assert self.image_pages.get(page) == image.item.hash, (
                    f"{chunk.rid}: image K/V page {page} lost")


def image_item(image_hash: int, offset: int, num_rows: int) -> MultimodalItem:
    return MultimodalItem(image_hash, offset, 1, num_cross_rows=num_rows,
                          cross_span=(offset, None))


def random_cross_specs(rng: random.Random, num_requests: int):
    """Prompts sharing prefixes and images; an image is one token whose K/V
    take 5 to 40 rows; some different images have the same row count."""
    prefixes = [[rng.choice(VOCAB) for _ in range(rng.randint(3, 20))] for _ in range(3)]
    images = {rng.getrandbits(62): rows for rows in (5, 13, 13, 40)}
    specs = []
    for index in range(num_requests):
        prompt = list(rng.choice(prefixes)) if rng.random() < 0.7 else []
        items = []
        for _ in range(rng.choice((0, 1, 1, 2))):
            image_hash = rng.choice(sorted(images))
            items.append(image_item(image_hash, len(prompt), images[image_hash]))
            prompt += [IMAGE_TOKEN] + [rng.choice(VOCAB) for _ in range(rng.randint(0, 6))]
        prompt += [rng.choice(VOCAB) for _ in range(rng.randint(1, 16))]
        specs.append(RequestSpec(f"r{index}", tuple(prompt), tuple(items), rng.randrange(1000),
                                 rng.randint(1, 16), rng.randint(0, 2 * index)))
    return specs


def flush_to_idle(scheduler):
    assert scheduler.flush_cache()
    assert scheduler.kv.allocator.num_used == 0
    assert not scheduler.kv.images.entries


@pytest.mark.parametrize("num_pages", [4096, 48])
@pytest.mark.parametrize("chunked_prefill_size", [None, 5])
@pytest.mark.parametrize("enable_mixed_chunk", [True, False])
def test_outputs_match_the_reference(num_pages, chunked_prefill_size, enable_mixed_chunk):
    """Chunked prefill, prefix-cache hits, mixed steps and (on the small
    pool) preemption give every request its reference tokens; the pages
    return to idle after the cache is flushed."""
    # no decode reserve on the small pool: requests are admitted together and must preempt
    conservativeness = 0.0 if num_pages < 100 else 1.0
    num_preemptions = 0
    for seed in range(4):
        specs = random_cross_specs(random.Random(seed), 24)
        result = run_specs(specs, num_pages=num_pages, runner_class=FakeCrossRunner,
                           chunked_prefill_size=chunked_prefill_size,
                           schedule_conservativeness=conservativeness,
                           enable_mixed_chunk=enable_mixed_chunk)
        for spec in specs:
            assert result.output_ids[spec.rid] == spec.reference(), spec.rid
        num_preemptions += result.scheduler.metrics.num_preemptions
        flush_to_idle(result.scheduler)
    # (mixed steps preempt less: decodes take their pages before admission does)
    assert num_preemptions > 0 or num_pages > 48


def scheduler_for(runner, num_pages=256, **sched_args):
    return Scheduler(SchedulerConfig(**sched_args), CacheConfig(page_size=runner.page_size),
                     num_pages, 100000, image_rows_per_page=ROWS_PER_PAGE)


def image_request(rid, image_hash, rows=20, tail=(30, 31, 32, 33, 34, 35, 36, 37)):
    prompt = [10, 11, 12, 13, 14, IMAGE_TOKEN] + list(tail)
    return Request(rid, prompt, SamplingParams(max_new_tokens=3), [image_item(image_hash, 5, rows)])


def test_a_prefix_hit_reuses_the_image_kv_and_another_image_gets_its_own():
    runner = FakeCrossRunner(4, 256)
    scheduler = scheduler_for(runner)
    for rid, image_hash in (("first", 1), ("again", 1), ("other", 2)):
        scheduler.add_request(runner.register(image_request(rid, image_hash)))
        run_until_idle(scheduler, runner)
        if rid == "first":
            pages_of_first = set(scheduler.kv.images.entries[1].pages)
    assert runner.num_image_writes == 2  # "again" wrote nothing
    assert not pages_of_first & set(scheduler.kv.images.entries[2].pages)
    first_chunk = {}
    for chunk in (chunk for batch in runner.batches for chunk in batch.chunks):
        first_chunk.setdefault(chunk.rid, chunk)
    assert [image.needs_write for image in first_chunk["again"].cross_images] == [False]
    assert first_chunk["again"].start_pos == 12  # three whole pages cached, the image's among them
    assert first_chunk["other"].start_pos == 4  # only the page before its image
    flush_to_idle(scheduler)


def test_concurrent_requests_with_one_new_image_write_it_once_per_step():
    runner = FakeCrossRunner(4, 256)
    scheduler = scheduler_for(runner)
    for rid in ("a", "b"):
        scheduler.add_request(runner.register(image_request(rid, 7, tail=(30 + len(rid),))))
    run_until_idle(scheduler, runner)
    (first_batch, *_) = runner.batches
    assert len(first_batch.chunks) == 2 and len(scheduler.kv.images.entries) <= 1
    assert runner.num_image_writes == 2  # both chunks of the first step carry the write
    flush_to_idle(scheduler)


@pytest.mark.parametrize("abort_at", range(0, 30, 3))
def test_aborts_at_every_stage_free_the_image_kv(abort_at):
    rng = random.Random(abort_at)
    specs = random_cross_specs(rng, 10)
    runner = FakeCrossRunner(4, 64)
    scheduler = scheduler_for(runner, num_pages=64, chunked_prefill_size=5)
    for spec in specs:
        scheduler.add_request(runner.register(spec.build()))
    for step in range(400):
        if not scheduler.has_work():
            break
        if step % 30 == abort_at:
            live = sorted(scheduler.requests)
            for rid in rng.sample(live, min(3, len(live))):
                scheduler.abort(rid)
            check_invariants(scheduler)
        scheduler.step(runner)
        check_invariants(scheduler)
    assert not scheduler.has_work()
    flush_to_idle(scheduler)


def test_a_failed_step_frees_the_image_it_was_writing():
    class FailingRunner(FakeCrossRunner):
        def forward(self, batch):
            if any(image.needs_write for c in batch.chunks for image in c.cross_images):
                raise RuntimeError("tower failed")
            return super().forward(batch)

    runner = FailingRunner(4, 64)
    scheduler = scheduler_for(runner, num_pages=64)
    scheduler.add_request(runner.register(image_request("r", 3)))
    outputs = run_until_idle(scheduler, runner)
    assert outputs["r"][-1].finish_reason == "error"
    assert not scheduler.kv.images.entries and scheduler.kv.allocator.num_used == 0


def test_a_prompt_whose_image_kv_cannot_fit_is_refused_naming_it():
    runner = FakeCrossRunner(4, 8)
    scheduler = scheduler_for(runner, num_pages=8)
    request = image_request("big", 9, rows=ROWS_PER_PAGE * 7)
    with pytest.raises(ValueError, match="images' cross-attention K/V take 7 pages"):
        scheduler.add_request(request)


def test_the_table_shares_by_hash_and_frees_with_the_last_reference():
    allocator = PageAllocator(10)
    table = ImageKVTable(allocator, rows_per_page=4)
    item = image_item(5, 0, 9)
    first, second = table.acquire(item), table.acquire(item)
    assert first is second and len(first.pages) == 3 and allocator.num_used == 3
    assert table.hold_for_node(5) and not table.hold_for_node(6)
    table.release(first)
    table.release(second)
    assert table.num_evictable_pages == 3 and allocator.num_used == 3
    table.drop_for_node(5)
    assert allocator.num_used == 0 and not table.entries
    assert table.acquire(image_item(6, 0, 41)) is None and allocator.num_used == 0
    with pytest.raises(RuntimeError):
        table.release(first)


def test_new_image_rows_count_against_the_prefill_budget():
    """Image K/V rows to compute count as prefill tokens (never chunked):
    with a 64-token budget, two 14-token prompts with new 20-row images fill
    a batch; a request whose image is already written costs only its text;
    a first request over the budget still runs (alone)."""
    runner = FakeCrossRunner(4, 512)
    scheduler = scheduler_for(runner, max_prefill_tokens=64, chunked_prefill_size=None)
    for index in range(4):
        scheduler.add_request(runner.register(image_request(f"new{index}", 100 + index)))
    scheduler.step(runner)
    assert [c.rid for c in runner.batches[-1].chunks] == ["new0", "new1"]
    run_until_idle(scheduler, runner)
    for index in range(4):  # the same images again: written, cached, cheap
        scheduler.add_request(runner.register(image_request(f"again{index}", 100 + index)))
    scheduler.step(runner)
    assert len(runner.batches[-1].chunks) == 4
    run_until_idle(scheduler, runner)
    scheduler.add_request(runner.register(image_request("huge", 200, rows=ROWS_PER_PAGE * 30)))
    outputs = run_until_idle(scheduler, runner)
    assert outputs["huge"][-1].finish_reason == "length"
    flush_to_idle(scheduler)


def test_the_prefill_log_counts_image_rows_as_sglang_does(caplog):
    """#new-token counts the image K/V rows a step computes, #cached-token
    those found in the pool (SGLang: 4 tiles x 1601 + text for one image)."""
    runner = FakeCrossRunner(4, 256)
    scheduler = scheduler_for(runner)
    with caplog.at_level("INFO", logger="pyvlm.engine"):
        for rid in ("first", "again"):
            scheduler.add_request(runner.register(image_request(rid, 1)))
            run_until_idle(scheduler, runner)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Prefill")]
    assert "#new-token: 34, #cached-token: 0" in lines[0]  # 14 text tokens + 20 image rows
    assert "#new-token: 2, #cached-token: 32" in lines[1]  # 12 cached tokens + the 20 rows
    flush_to_idle(scheduler)
