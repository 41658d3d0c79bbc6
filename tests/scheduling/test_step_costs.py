"""A step costs the scheduler time in its new tokens, not in the context:
chunks pass the request's own lists (no per-step copies of page tables or
outputs), and a token span is sliced without building prompt + output."""

from pyvlm.config import CacheConfig, SchedulerConfig
from pyvlm.scheduling.request import Request
from pyvlm.scheduling.scheduler import Scheduler
from pyvlm.scheduling.types import SamplingParams

from tests.scheduling.fakes import VOCAB, FakeRunner

PAGE = 4


def test_chunks_pass_the_requests_own_lists():
    """No per-step copies of a request's page table or outputs (O(context)
    per request per step): the chunk holds the request's lists."""
    runner = FakeRunner(PAGE, 64)
    scheduler = Scheduler(SchedulerConfig(), CacheConfig(page_size=PAGE), 64, 1000)
    request = Request("a", [11, 12, 13, 14, 15], SamplingParams(max_new_tokens=6))
    scheduler.add_request(runner.register(request))
    for _ in range(3):
        scheduler.step(runner)
        chunk = runner.batches[-1].chunks[0]
        assert chunk.page_table is request.page_table and chunk.output_ids is request.output_ids
        assert chunk.prompt_ids is request.prompt_ids


def test_token_ids_is_a_slice_of_prompt_and_output(rng):
    request = Request("a", [rng.choice(VOCAB) for _ in range(9)])
    request.output_ids = [rng.choice(VOCAB) for _ in range(5)]
    every = request.prompt_ids + request.output_ids
    for start in range(15):
        for end in range(start, 15):
            assert request.token_ids(start, end) == every[start:end]


def _rows_in_full(mrope, start, count):
    """rows_for as the whole formula (every token's position computed)."""
    num_prompt = len(mrope.rows[0])
    return [[row[i] if i < num_prompt else i + mrope.delta for i in range(start, start + count)]
            for row in mrope.rows]


def test_mrope_positions_of_generated_tokens_follow_the_formula(rng):
    from pyvlm.scheduling.positions import MropePositions

    rows = tuple(tuple(rng.randrange(50) for _ in range(12)) for _ in range(3))
    mrope = MropePositions(rows, delta=-7)
    for start in range(20):
        for count in range(1, 5):
            assert mrope.rows_for(start, count) == _rows_in_full(mrope, start, count)


def test_images_overlapping_a_span_past_the_prompt_are_none(rng):
    from pyvlm.scheduling.types import MultimodalItem

    request = Request("a", [1] * 10, mm_items=[MultimodalItem(1, 2, 3), MultimodalItem(2, 7, 3)])
    request.output_ids = [5, 6, 7]
    for start in range(13):
        for end in range(start + 1, 14):
            assert request.mm_items_overlapping(start, end) == [
                item for item in request.mm_items
                if item.offset < end and start < item.offset + item.length]
