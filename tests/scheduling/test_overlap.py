"""Overlap scheduling (pyvlm.scheduling.overlap) never changes what is
generated: decode step N+1 is launched before step N is read, fed
FUTURE_TOKEN, and the outputs still equal sequential generation, with stop
tokens, length limits, arrivals, aborts and tight pools; the fake runner
checks every position's KV, and every page comes back."""

from dataclasses import replace

import pytest

from pyvlm.scheduling.future_tokens import FUTURE_TOKEN
from pyvlm.scheduling.types import ForwardBatch
from tests.scheduling.fakes import VOCAB, FakeRunner, check_invariants
from tests.scheduling.test_scheduler_parity import assert_all_pages_back, assert_matches_reference
from tests.scheduling.workload import random_specs, run_specs


class Launched:
    def __init__(self, results):
        self._results = results

    def wait(self):
        return self._results


class LaunchingFakeRunner(FakeRunner):
    """FakeRunner with launch(): a FUTURE_TOKEN is the token the previous
    launch drew for the request (as the real runner reads it on the device);
    the chunk then runs as if the scheduler had known it."""

    def __init__(self, page_size: int, num_pages: int):
        super().__init__(page_size, num_pages)
        self.previous = {}
        self.num_future_chunks = 0
        self.launches = []

    def launch(self, batch: ForwardBatch) -> Launched:
        chunks = [self._known(chunk) for chunk in batch.chunks]
        results = self.forward(ForwardBatch(batch.is_decode, chunks))
        self.previous = {c.rid: r.token_id for c, r in zip(chunks, results) if r is not None}
        self.launches.append(batch)
        return Launched(results)

    def _known(self, chunk):
        if chunk.token_ids != [FUTURE_TOKEN]:
            return chunk
        self.num_future_chunks += 1
        token = self.previous[chunk.rid]
        return replace(chunk, token_ids=[token], output_ids=list(chunk.output_ids) + [token])


def stop_specs(rng, num_requests):
    """Random specs, some stopping on tokens the fake model often draws."""
    specs = random_specs(rng, num_requests, max_new_tokens=30)
    return [replace(spec, stop_token_ids=tuple(rng.sample(VOCAB, 3)) if i % 2 else ())
            for i, spec in enumerate(specs)]


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("enable_mixed_chunk", [True, False])
def test_overlapped_outputs_match_sequential_generation(rng, page_size, enable_mixed_chunk):
    specs = stop_specs(rng, 12)
    result = run_specs(specs, page_size=page_size, runner_class=LaunchingFakeRunner,
                       overlap_schedule=True, enable_mixed_chunk=enable_mixed_chunk,
                       chunked_prefill_size=8)
    assert_matches_reference(specs, result)
    assert_all_pages_back(result)
    assert result.runner.num_future_chunks > 0


def test_a_tight_pool_falls_back_to_plain_steps(rng):
    specs = stop_specs(rng, 10)
    largest = max(len(spec.prompt_ids) + spec.max_new_tokens for spec in specs)
    result = run_specs(specs, page_size=4, num_pages=-(-largest // 4) + 2,
                       runner_class=LaunchingFakeRunner, overlap_schedule=True,
                       schedule_conservativeness=0.0)
    assert_matches_reference(specs, result)
    assert_all_pages_back(result)


def test_aborts_while_a_step_is_in_flight_drop_its_result(rng):
    specs = [replace(spec, arrival_step=0, max_new_tokens=20) for spec in random_specs(rng, 6)]
    aborted = set()

    def abort_one(scheduler, outputs):
        if scheduler._launched is not None and not aborted:
            rid = scheduler._launched.step.decodes[0].rid
            aborted.add(rid)
            final = scheduler.abort(rid)
            assert final.finish_reason == "abort"
            check_invariants(scheduler)

    result = run_specs(specs, runner_class=LaunchingFakeRunner, overlap_schedule=True,
                       on_step=abort_one)
    assert aborted
    for spec in specs:
        if spec.rid not in aborted:
            assert result.output_ids[spec.rid] == spec.reference(), spec.rid
        else:  # what it got before the abort is a prefix of its generation
            got = result.output_ids.get(spec.rid, [])
            assert got == spec.reference()[:len(got)]
    assert_all_pages_back(result)


def test_no_request_ends_by_length_with_a_step_past_it(rng):
    """A request whose next token is its last by max_new_tokens is left out
    of the step launched after it: no step ever runs a token past the limit."""
    specs = [replace(spec, arrival_step=0) for spec in random_specs(rng, 8, max_new_tokens=12)]
    result = run_specs(specs, runner_class=LaunchingFakeRunner, overlap_schedule=True)
    limits = {spec.rid: spec.max_new_tokens for spec in specs}
    for batch in result.runner.launches:
        for chunk in batch.chunks:
            assert chunk.step < limits[chunk.rid], (chunk.rid, chunk.step)
    assert_matches_reference(specs, result)


def test_overlap_off_launches_nothing(rng):
    specs = random_specs(rng, 6)
    result = run_specs(specs, runner_class=LaunchingFakeRunner, overlap_schedule=False)
    assert result.runner.launches == []
    assert_matches_reference(specs, result)
