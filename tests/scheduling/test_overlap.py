"""Overlap scheduling (pyvlm.scheduling.overlap) never changes what is
generated: step N+1 (decode, prefill or mixed) is launched before step N is
read, its decodes fed FUTURE_TOKEN, and the outputs still equal sequential
generation, with requests waiting, chunked prompts, mixed steps, stop
tokens, length limits, aborts, failures, images and tight pools; the fake
runner checks every position's KV and rotary positions, counts what was
launched while another step was unread, and every page comes back."""

import random
from dataclasses import dataclass, replace

import pytest

from pyvlm.scheduling.future_tokens import FUTURE_TOKEN
from pyvlm.scheduling.positions import MropePositions
from pyvlm.scheduling.types import ForwardBatch
from tests.scheduling.fakes import VOCAB, FakeRunner, check_invariants, reference_generate, stage_of
from tests.scheduling.test_fault_isolation import FailingRunner
from tests.scheduling.test_image_kv import FakeCrossRunner, flush_to_idle, random_cross_specs
from tests.scheduling.test_scheduler_parity import assert_all_pages_back, assert_matches_reference
from tests.scheduling.workload import RequestSpec, random_specs, run_specs


class Launched:
    def __init__(self, runner, results):
        self._runner, self._results, self._is_read = runner, results, False

    def wait(self):
        if not self._is_read:
            self._is_read = True
            self._runner.num_unread -= 1
        return self._results


class LaunchingFakeRunner(FakeRunner):
    """FakeRunner with launch(): a FUTURE_TOKEN is the token the previous
    launch drew for the request (as the real runner reads it on the device);
    the chunk then runs as if the scheduler had known it. Every chunk's
    rotary positions are checked against the request's (linear or M-RoPE).
    `overlapped` marks the launches made while an earlier one was unread."""

    def __init__(self, page_size: int, num_pages: int):
        super().__init__(page_size, num_pages)
        self.previous = {}
        self.previous_stages = {}  # rid -> stage of its chunk in the previous launch
        self.num_future_chunks = 0
        self.num_first_decodes_fed_future = 0  # right after the request's prefill, unread
        self.num_chunks_after_unread_chunks = 0  # a prompt's next chunk after one unread
        self.launches, self.overlapped = [], []
        self.num_unread = 0
        self.mrope = {}

    def register(self, request):
        self.mrope[request.rid] = request.mrope
        return super().register(request)

    def launch(self, batch: ForwardBatch) -> Launched:
        chunks = [self._known(chunk) for chunk in batch.chunks]
        for chunk in chunks:
            self._check_positions(chunk)
            self.num_chunks_after_unread_chunks += (
                self.num_unread > 0 and self.previous_stages.get(chunk.rid) == "mid chunk")
        results = self.forward(ForwardBatch(batch.is_decode, chunks))
        self.previous = {c.rid: r.token_id for c, r in zip(chunks, results) if r is not None}
        self.previous_stages = {c.rid: stage_of(c) if c.sample else "mid chunk" for c in chunks}
        self.launches.append(batch)
        self.overlapped.append(self.num_unread > 0)
        self.num_unread += 1
        return Launched(self, results)

    def _known(self, chunk):
        if chunk.token_ids != [FUTURE_TOKEN]:
            return chunk
        self.num_future_chunks += 1
        self.num_first_decodes_fed_future += self.previous_stages[chunk.rid] == "prefill"
        token = self.previous[chunk.rid]
        return replace(chunk, token_ids=[token], output_ids=list(chunk.output_ids) + [token])

    def _check_positions(self, chunk):
        mrope, start = self.mrope[chunk.rid], chunk.start_pos
        span = range(start, start + chunk.num_new_tokens)
        if mrope is None:
            assert chunk.positions == [list(span)], chunk.rid
            return
        expected = [[row[p] if p < len(row) else p + mrope.delta for p in span]
                    for row in mrope.rows]
        assert chunk.positions == expected, chunk.rid

    def num_overlapped(self, kind: str) -> int:
        """Launches of a kind ("prefill": no decode chunk; "mixed": both)
        made while an earlier launch was unread."""
        return sum(is_overlapped and kind_of(batch) == kind
                   for batch, is_overlapped in zip(self.launches, self.overlapped))


def kind_of(batch: ForwardBatch) -> str:
    stages = {stage_of(chunk) for chunk in batch.chunks}
    return "mixed" if len(stages) == 2 else stages.pop()


def stop_specs(rng, num_requests, **spec_args):
    """Random specs, some stopping on tokens the fake model often draws."""
    specs = random_specs(rng, num_requests, max_new_tokens=30, **spec_args)
    return [replace(spec, stop_token_ids=tuple(rng.sample(VOCAB, 3)) if i % 2 else ())
            for i, spec in enumerate(specs)]


def run_overlapped(specs, runner_class=LaunchingFakeRunner, **sched_args):
    return run_specs(specs, runner_class=runner_class, overlap_schedule=True, **sched_args)


def ran_past_their_end(result) -> int:
    """Chunks launched for a token after the request's last one (each a
    result that had to be dropped)."""
    return sum(chunk.step >= len(result.output_ids[chunk.rid])
               for batch in result.runner.launches for chunk in batch.chunks if chunk.sample)


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("chunked_prefill_size", [None, 3, 8])
@pytest.mark.parametrize("enable_mixed_chunk", [True, False])
def test_overlapped_outputs_match_sequential_generation(rng, page_size, chunked_prefill_size,
                                                        enable_mixed_chunk):
    specs = stop_specs(rng, 12)
    result = run_overlapped(specs, page_size=page_size, enable_mixed_chunk=enable_mixed_chunk,
                            chunked_prefill_size=chunked_prefill_size)
    assert_matches_reference(specs, result)
    assert_all_pages_back(result)
    runner = result.runner
    assert runner.num_future_chunks > 0
    # (without mixing a prompt waiting runs before the decodes, which then feed known tokens)
    assert runner.num_first_decodes_fed_future > 0 or not enable_mixed_chunk
    assert runner.num_overlapped("prefill") + runner.num_overlapped("mixed") > 0
    assert sum(runner.overlapped) > len(runner.launches) // 2


@pytest.mark.parametrize("enable_mixed_chunk", [True, False])
def test_steps_overlap_while_requests_wait(rng, enable_mixed_chunk):
    """Everything arrives at once and only 3 requests run: the others wait
    for admission, and admissions are launched while a step is in flight."""
    specs = [replace(spec, arrival_step=0) for spec in stop_specs(rng, 12)]
    seen = []

    def watch(scheduler, outputs):
        seen.append(scheduler._launched is not None and bool(scheduler.waiting))

    result = run_overlapped(specs, max_running_requests=3, chunked_prefill_size=8,
                            enable_mixed_chunk=enable_mixed_chunk, on_step=watch)
    assert_matches_reference(specs, result)
    assert_all_pages_back(result)
    assert sum(seen) > len(specs)
    kind = "mixed" if enable_mixed_chunk else "prefill"
    assert result.runner.num_overlapped(kind) > 0


def test_mixed_steps_with_chunked_prompts_overlap(rng):
    """Long prompts arrive while short ones decode, in chunks of 16: mixed
    steps, a prompt's next chunk and a request's first decode are launched
    while the step with its previous chunk is unread."""
    specs = [replace(spec, arrival_step=2 * i) for i, spec in
             enumerate(stop_specs(rng, 10, max_prompt_tail=60))]
    result = run_overlapped(specs, chunked_prefill_size=16, max_running_requests=6)
    assert_matches_reference(specs, result)
    assert_all_pages_back(result)
    runner = result.runner
    assert runner.num_overlapped("mixed") > 0
    assert runner.num_chunks_after_unread_chunks > 0
    assert runner.num_first_decodes_fed_future > 0


@pytest.mark.parametrize("enable_mixed_chunk", [True, False])
def test_a_stop_token_in_the_step_in_flight_drops_the_next_steps_result(rng, enable_mixed_chunk):
    """Requests that stop at their first token (sampled by their prefill)
    or at a later one: the step launched after that one has already run
    them one token too far; those results are dropped, nothing is lost or
    duplicated, and their pages come back."""
    runner_up = RequestSpec("long", tuple(rng.choice(VOCAB) for _ in range(5)), (), 1, 40, 0)
    specs = [runner_up]
    for index in range(6):
        prompt = tuple(rng.choice(VOCAB) for _ in range(rng.randint(2, 20)))
        seed = rng.randrange(1000)
        tokens = reference_generate(prompt, [], seed, 20)
        stop_at = index % 3 * 4  # first, fifth or ninth token
        specs.append(RequestSpec(f"s{index}", prompt, (), seed, 20, index,
                                 stop_token_ids=(tokens[stop_at],)))
    result = run_overlapped(specs, enable_mixed_chunk=enable_mixed_chunk, chunked_prefill_size=8)
    assert_matches_reference(specs, result)
    for spec in specs[1:]:
        assert result.outputs[spec.rid][-1].finish_reason == "stop"
    # mixed, every stopped request decoded in the step after its last one
    # (without mixing, a prompt waiting may take that step instead)
    assert ran_past_their_end(result) >= (len(specs) - 1 if enable_mixed_chunk else 1)
    assert_all_pages_back(result)


def test_stop_tokens_in_flight_under_load(rng):
    specs = [replace(spec, arrival_step=spec.arrival_step // 3) for spec in stop_specs(rng, 24)]
    result = run_overlapped(specs, chunked_prefill_size=8, max_running_requests=6)
    assert_matches_reference(specs, result)
    assert ran_past_their_end(result) > 0
    assert_all_pages_back(result)


def test_a_tight_pool_falls_back_to_plain_steps(rng):
    """In a pool the decodes outgrow, a step whose pages are short is
    planned after the one in flight is read, and preempts; the outputs
    stay exact and steps with prefill still overlap."""
    specs = stop_specs(rng, 10)
    largest = max(len(spec.prompt_ids) + spec.max_new_tokens for spec in specs)
    result = run_overlapped(specs, page_size=4, num_pages=-(-largest // 4) + 2,
                            schedule_conservativeness=0.0, chunked_prefill_size=8)
    assert_matches_reference(specs, result)
    assert_all_pages_back(result)
    runner = result.runner
    assert result.scheduler.metrics.num_preemptions > 0  # only ever after a drain
    assert runner.num_overlapped("prefill") + runner.num_overlapped("mixed") > 0


def ends_prompt(request, n) -> bool:
    return request.num_computed_tokens + n == request.num_tokens


ABORT_TARGETS = {
    # which request of the step in flight to abort: by what that step runs of it
    "decode": lambda request, n, flight: request in flight.step.decodes,
    "last chunk": lambda request, n, flight: (request not in flight.step.decodes
                                              and ends_prompt(request, n)),
    "mid chunk": lambda request, n, flight: not ends_prompt(request, n),
}


@pytest.mark.parametrize("target", sorted(ABORT_TARGETS))
def test_aborts_while_a_step_is_in_flight_drop_its_result(rng, target):
    specs = [replace(spec, arrival_step=i, max_new_tokens=20)
             for i, spec in enumerate(random_specs(rng, 8, max_prompt_tail=40))]
    aborted, finals = [], {}
    is_target = ABORT_TARGETS[target]

    def abort_one(scheduler, outputs):
        flight = scheduler._launched
        if flight is None or len(aborted) >= 2:
            return
        for request, n in flight.step.items:
            if request.rid not in aborted and is_target(request, n, flight):
                aborted.append(request.rid)
                finals[request.rid] = scheduler.abort(request.rid)
                check_invariants(scheduler)
                return

    result = run_overlapped(specs, chunked_prefill_size=6, on_step=abort_one)
    assert aborted
    for spec in specs:
        got = result.output_ids.get(spec.rid, [])
        if spec.rid in aborted:  # what it got before the abort is a prefix of its generation
            final = finals[spec.rid]
            assert final.finish_reason == "abort" and final.completion_tokens == len(got)
            assert got == spec.reference()[:len(got)]
        else:
            assert got == spec.reference(), spec.rid
    assert_all_pages_back(result)


def test_no_request_ends_by_length_with_a_step_past_it(rng):
    """A request whose next token is its last by max_new_tokens is left out
    of the step launched after it: no step ever runs a token past the limit."""
    specs = [replace(spec, arrival_step=0) for spec in random_specs(rng, 8, max_new_tokens=12)]
    result = run_overlapped(specs, chunked_prefill_size=8, max_running_requests=4)
    limits = {spec.rid: spec.max_new_tokens for spec in specs}
    for batch in result.runner.launches:
        for chunk in batch.chunks:
            assert chunk.step < limits[chunk.rid], (chunk.rid, chunk.step)
    assert_matches_reference(specs, result)


@dataclass(frozen=True)
class MropeSpec(RequestSpec):
    """A request with M-RoPE positions: three arbitrary rows over the
    prompt, generated tokens at index + delta."""

    def build(self):
        request = super().build()
        rng = random.Random(self.seed)
        rows = tuple(tuple(rng.randrange(1000) for _ in self.prompt_ids) for _ in range(3))
        request.mrope = MropePositions(rows, rng.randrange(-50, 50))
        return request


@pytest.mark.parametrize("enable_mixed_chunk", [True, False])
def test_mrope_positions_of_overlapped_steps(rng, enable_mixed_chunk):
    """Each chunk's positions are the request's, first decodes fed a
    future token (at the prompt's length + delta) and chunks continuing
    past a chunk in flight included (the runner checks every chunk)."""
    specs = [MropeSpec(**spec.__dict__) for spec in stop_specs(rng, 12)]
    result = run_overlapped(specs, chunked_prefill_size=5, enable_mixed_chunk=enable_mixed_chunk)
    assert_matches_reference(specs, result)
    assert result.runner.num_first_decodes_fed_future > 0 or not enable_mixed_chunk
    assert_all_pages_back(result)


class LaunchingCrossRunner(LaunchingFakeRunner, FakeCrossRunner):
    """Cross-attention images (their K/V pages checked on every step), launched."""


@pytest.mark.parametrize("chunked_prefill_size", [None, 5])
@pytest.mark.parametrize("enable_mixed_chunk", [True, False])
def test_cross_attention_images_with_overlap(chunked_prefill_size, enable_mixed_chunk):
    """Image K/V written by a request's chunk in flight are not written
    again by its chunk in the step after (its first decode, or its next
    chunk); outputs stay exact and every image page comes back."""
    for seed in range(3):
        specs = random_cross_specs(random.Random(seed), 24)
        result = run_overlapped(specs, runner_class=LaunchingCrossRunner,
                                chunked_prefill_size=chunked_prefill_size,
                                enable_mixed_chunk=enable_mixed_chunk)
        for spec in specs:
            assert result.output_ids[spec.rid] == spec.reference(), spec.rid
        runner = result.runner
        assert runner.num_first_decodes_fed_future > 0
        for batch in runner.launches:
            for chunk in batch.chunks:
                if chunk.token_ids == [FUTURE_TOKEN]:
                    assert not any(image.needs_write for image in chunk.cross_images)
        flush_to_idle(result.scheduler)


class RefusingLaunchRunner(LaunchingFakeRunner):
    """Every other launch of a step with prefill while another is unread
    raises before running anything, as a launch that fails would."""

    def __init__(self, page_size, num_pages):
        super().__init__(page_size, num_pages)
        self.num_refused = 0
        self._num_seen = 0

    def launch(self, batch):
        if self.num_unread and kind_of(batch) != "decode":
            self._num_seen += 1
            if self._num_seen % 2:
                self.num_refused += 1
                raise RuntimeError("launch refused")
        return super().launch(batch)


def test_a_launch_that_raises_runs_its_step_plainly(rng):
    specs = stop_specs(rng, 12)
    result = run_overlapped(specs, runner_class=RefusingLaunchRunner, chunked_prefill_size=8)
    assert result.runner.num_refused > 0
    assert_matches_reference(specs, result)
    assert_all_pages_back(result)


class LaunchingFailingRunner(LaunchingFakeRunner, FailingRunner):
    """Raises for any batch holding bad_rid's chunk at `stage`, launched or not."""


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_only_the_failing_request_fails_with_overlap(rng, stage):
    specs = random_specs(rng, 10, max_new_tokens=12)
    specs = [spec if spec.rid != "r3" else replace(spec, max_new_tokens=6) for spec in specs]
    runner_class = type("Failing", (LaunchingFailingRunner,), dict(bad_rid="r3", stage=stage,
                                                                  error=RuntimeError("fault")))
    result = run_overlapped(specs, runner_class=runner_class, chunked_prefill_size=5,
                            max_running_requests=4)
    assert result.runner.num_faults > 0
    assert result.outputs["r3"][-1].finish_reason == "error"
    for spec in specs:
        if spec.rid != "r3":
            assert result.output_ids[spec.rid] == spec.reference(), spec.rid
    assert result.scheduler.stats()["num_failed_requests"] == 1
    assert_all_pages_back(result)


def test_overlap_off_launches_nothing(rng):
    specs = random_specs(rng, 6)
    result = run_specs(specs, runner_class=LaunchingFakeRunner, overlap_schedule=False)
    assert result.runner.launches == []
    assert_matches_reference(specs, result)
