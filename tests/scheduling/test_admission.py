"""Admission keeps decode room for what is running (the decode reserve), so
near a full pool a request admitted now is not preempted a step later,
preemption never turns into a prefill/preempt loop, and a small pool costs
no more throughput than its size ratio."""

from pyvlm.config import CacheConfig, SchedulerConfig
from pyvlm.scheduling.decode_reserve import MIN_RESERVED_STEPS, DecodeReserve
from pyvlm.scheduling.request import Request
from pyvlm.scheduling.scheduler import Scheduler
from pyvlm.scheduling.types import SamplingParams

from tests.scheduling.fakes import VOCAB, FakeRunner, check_invariants, reference_generate

PAGE_SIZE = 4


def random_requests(rng, num_requests, max_new_tokens=(40, 120)):
    return [Request(f"r{i}", [rng.choice(VOCAB) for _ in range(rng.randint(4, 40))],
                    SamplingParams(max_new_tokens=rng.randint(*max_new_tokens)), seed=i)
            for i in range(num_requests)]


class Observed:
    """Runs requests to completion, recording for every preemption how many
    decode steps its victim had run since its last admission."""

    def __init__(self, requests, num_pages, **sched_args):
        self.scheduler = Scheduler(SchedulerConfig(**sched_args), CacheConfig(page_size=PAGE_SIZE),
                                   num_pages, 100000)
        self.runner = FakeRunner(PAGE_SIZE, num_pages)
        self.admitted_at, self.decode_steps_at_preemption = {}, []
        self.num_steps, self.max_usage = 0, 0.0
        self._wrap(self.scheduler)
        for request in requests:
            self.scheduler.add_request(self.runner.register(request))

    def _wrap(self, scheduler):
        admit, preempt = scheduler._admit, scheduler._preempt

        def observed_admit(request, budget, plan):
            ok = admit(request, budget, plan)
            if ok:
                self.admitted_at[request.rid] = len(request.output_ids)
            return ok

        def observed_preempt(request):
            # The prefill after admission samples one token; the rest are decode steps.
            self.decode_steps_at_preemption.append(
                len(request.output_ids) - self.admitted_at[request.rid] - 1)
            preempt(request)

        scheduler._admit, scheduler._preempt = observed_admit, observed_preempt

    def run(self, max_steps=100000):
        outputs = {}
        while self.scheduler.has_work():
            assert self.num_steps < max_steps, "scheduler did not finish"
            for out in self.scheduler.step(self.runner):
                outputs.setdefault(out.rid, []).extend(out.new_token_ids)
            self.num_steps += 1
            self.max_usage = max(self.max_usage, self.scheduler.stats()["token_usage"])
            check_invariants(self.scheduler)
        return outputs


def assert_reference_outputs(requests, outputs):
    for request in requests:
        assert outputs[request.rid] == reference_generate(
            request.prompt_ids, [], request.seed, request.sampling.max_new_tokens), request.rid


def test_no_request_is_preempted_in_its_first_decode_steps(rng):
    requests = random_requests(rng, 24)
    num_pages = 3 * (40 + 120) // PAGE_SIZE  # about three of the longest requests at once
    observed = Observed(requests, num_pages, max_running_requests=64)
    assert_reference_outputs(requests, observed.run())
    assert observed.max_usage > 0.8, "the pool was never near full"
    assert all(n >= MIN_RESERVED_STEPS for n in observed.decode_steps_at_preemption), \
        observed.decode_steps_at_preemption


def test_without_the_reserve_a_full_pool_preempts_at_once(rng):
    """The failure the reserve prevents: packing prompts preempts requests
    within a step or two of their admission."""
    requests = random_requests(rng, 24)
    observed = Observed(requests, 3 * (40 + 120) // PAGE_SIZE, max_running_requests=64,
                        schedule_conservativeness=0.0)
    assert_reference_outputs(requests, observed.run())
    assert min(observed.decode_steps_at_preemption) < MIN_RESERVED_STEPS


def test_preemption_never_loops(rng):
    """A low estimate (conservativeness 0.2) on a pool that holds one long
    request still preempts, but never a request just (re)admitted: no
    prefill/preempt ping-pong, and everything finishes."""
    requests = random_requests(rng, 16)
    observed = Observed(requests, (40 + 120) // PAGE_SIZE + 10, max_running_requests=64,
                        schedule_conservativeness=0.2)
    assert_reference_outputs(requests, observed.run())
    assert observed.decode_steps_at_preemption, "the pool was too large to preempt"
    assert min(observed.decode_steps_at_preemption) >= MIN_RESERVED_STEPS


def test_a_small_pool_costs_at_most_its_size_ratio(rng):
    requests = random_requests(rng, 32)
    small, large = 2 * (40 + 120) // PAGE_SIZE, 4 * (40 + 120) // PAGE_SIZE
    steps = {}
    for num_pages in (small, large):
        copies = [Request(r.rid, list(r.prompt_ids), r.sampling, seed=r.seed) for r in requests]
        observed = Observed(copies, num_pages, max_running_requests=64)
        assert_reference_outputs(copies, observed.run())
        steps[num_pages] = observed.num_steps
    # Half the pool runs about half as many requests at once; the preemptions
    # it needs add recomputed prefills (seen up to 4% over 60 seeds), never
    # a thrash that multiplies the steps.
    assert steps[small] <= 1.1 * steps[large] * large / small, steps


def test_the_ratio_decays_and_resets_on_preemption():
    reserve = DecodeReserve(1.0)
    request = Request("r", [1, 2, 3], SamplingParams(max_new_tokens=1000), max_new_tokens=1000)
    first = reserve.num_tokens_for(request)
    assert first == 700
    for _ in range(10000):
        reserve.on_decode_step()
    assert MIN_RESERVED_STEPS <= reserve.num_tokens_for(request) < first
    reserve.on_preemption()
    assert reserve.num_tokens_for(request) == first
    request.output_ids = [5] * 997
    assert reserve.num_tokens_for(request) == 3  # never more than it may still generate
    assert DecodeReserve(0.0).num_tokens_for(request) == 0
