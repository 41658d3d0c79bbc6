"""A request the model fails on ends alone: the scheduler runs the failing
batch again one request at a time, fails the one that still fails, and
every other request generates exactly what it would have; pages return.
A DeviceFailure is not retried: it stops the step for the engine to handle."""

import pytest

from pyvlm.scheduling.errors import DeviceFailure
from pyvlm.scheduling.types import ForwardBatch

from tests.scheduling.fakes import FakeRunner, stage_of
from tests.scheduling.test_scheduler_parity import assert_all_pages_back
from tests.scheduling.workload import random_specs, run_specs


class FailingRunner(FakeRunner):
    """Raises `error` for any batch holding chunk `bad_rid` at `stage`
    (prefill or decode), before computing anything, as a model bug would."""

    bad_rid, stage, error = None, None, RuntimeError("injected fault")

    def __init__(self, page_size, num_pages):
        super().__init__(page_size, num_pages)
        self.num_faults = 0

    def forward(self, batch: ForwardBatch):
        if any(c.rid == self.bad_rid and stage_of(c) == self.stage for c in batch.chunks):
            self.num_faults += 1
            raise self.error
        return super().forward(batch)


def runner_class(bad_rid, stage, error=RuntimeError("injected fault")):
    return type("Failing", (FailingRunner,), dict(bad_rid=bad_rid, stage=stage, error=error))


@pytest.mark.parametrize("stage", ["prefill", "decode"])
@pytest.mark.parametrize("chunked_prefill_size", [None, 5])
def test_only_the_failing_request_fails(rng, stage, chunked_prefill_size):
    specs = random_specs(rng, 10, max_new_tokens=12)
    specs = [s if s.rid != "r3" else type(s)(**{**s.__dict__, "max_new_tokens": 6}) for s in specs]
    result = run_specs(specs, runner_class=runner_class("r3", stage),
                       chunked_prefill_size=chunked_prefill_size, max_running_requests=4)
    assert result.runner.num_faults > 0
    final = result.outputs["r3"][-1]
    assert final.finished and final.finish_reason == "error" and "RuntimeError" in final.error
    if stage == "decode":  # its prefill ran, so it streamed its first token before failing
        assert result.output_ids["r3"] == specs[3].reference()[:1]
    for spec in specs:
        if spec.rid != "r3":
            assert result.output_ids[spec.rid] == spec.reference(), spec.rid
            assert result.outputs[spec.rid][-1].error is None
    assert result.scheduler.stats()["num_failed_requests"] == 1
    assert_all_pages_back(result)


def test_a_batch_of_one_fails_without_a_retry(rng):
    specs = random_specs(rng, 1, max_new_tokens=5)
    result = run_specs(specs, runner_class=runner_class("r0", "prefill"))
    assert result.runner.num_faults == 1
    assert result.outputs["r0"][-1].finish_reason == "error"
    assert_all_pages_back(result)


def test_device_failure_is_not_retried(rng):
    specs = random_specs(rng, 4, max_new_tokens=5)
    with pytest.raises(DeviceFailure):
        run_specs(specs, runner_class=runner_class("r0", "prefill", DeviceFailure("gone")))
