"""Random request mixes (shared prefixes, images) and a driver that feeds
them to a scheduler over time."""

import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from pyvlm.config import CacheConfig, SchedulerConfig
from pyvlm.scheduling.request import Request
from pyvlm.scheduling.scheduler import Scheduler
from pyvlm.scheduling.types import MultimodalItem, SamplingParams, image_rows_per_page_of

from tests.scheduling.fakes import IMAGE_TOKEN, VOCAB, FakeRunner, joined_ids, reference_generate, run_until_idle


@dataclass(frozen=True)
class RequestSpec:
    rid: str
    prompt_ids: Tuple[int, ...]
    mm_items: Tuple[MultimodalItem, ...]
    seed: int
    max_new_tokens: int
    arrival_step: int
    stop_token_ids: Tuple[int, ...] = ()

    def build(self) -> Request:
        sampling = SamplingParams(max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop_token_ids)
        return Request(self.rid, list(self.prompt_ids), sampling, list(self.mm_items), self.seed)

    def reference(self) -> List[int]:
        return reference_generate(self.prompt_ids, self.mm_items, self.seed, self.max_new_tokens,
                                  self.stop_token_ids)


def random_specs(rng: random.Random, num_requests: int, max_prompt_tail: int = 24,
                 max_new_tokens: int = 24) -> List[RequestSpec]:
    """Prompts that share a few prefixes and images (same hash, same span
    length; some different images have the same length)."""
    prefixes = [[rng.choice(VOCAB) for _ in range(rng.randint(3, 40))] for _ in range(3)]
    image_lengths = {rng.getrandbits(62): length for length in (4, 9, 9)}
    return [_random_spec(rng, index, prefixes, image_lengths, max_prompt_tail, max_new_tokens)
            for index in range(num_requests)]


def _random_spec(rng, index, prefixes, image_lengths, max_prompt_tail, max_new_tokens) -> RequestSpec:
    prompt = list(rng.choice(prefixes)) if rng.random() < 0.7 else []
    mm_items = []
    if rng.random() < 0.5:
        image_hash = rng.choice(sorted(image_lengths))
        mm_items.append(MultimodalItem(image_hash, len(prompt), image_lengths[image_hash]))
        prompt += [IMAGE_TOKEN] * image_lengths[image_hash]
    prompt += [rng.choice(VOCAB) for _ in range(rng.randint(1, max_prompt_tail))]
    return RequestSpec(f"r{index}", tuple(prompt), tuple(mm_items), rng.randrange(1000),
                       rng.randint(1, max_new_tokens), rng.randint(0, 2 * index))


@dataclass
class RunResult:
    output_ids: Dict[str, List[int]]
    outputs: Dict[str, list]
    scheduler: Scheduler
    runner: FakeRunner
    max_running_seen: int = 0


def run_specs(specs: List[RequestSpec], page_size: int = 4, num_pages: int = 4096,
              context_length: int = 100000, on_step=None, runner_class=FakeRunner,
              **sched_args) -> RunResult:
    """Runs the specs (each added at its arrival step) to completion."""
    runner = runner_class(page_size, num_pages)
    cache = CacheConfig(page_size=page_size, disable_radix_cache=sched_args.pop("disable_radix_cache", False))
    scheduler = Scheduler(SchedulerConfig(**sched_args), cache, num_pages, context_length,
                          image_rows_per_page=image_rows_per_page_of(runner))
    pending = sorted(specs, key=lambda spec: spec.arrival_step)
    steps = [0]
    result = RunResult({}, {}, scheduler, runner)

    def add_arrivals_and_observe(outputs):
        steps[0] += 1
        while pending and pending[0].arrival_step <= steps[0]:
            scheduler.add_request(runner.register(pending.pop(0).build()))
        result.max_running_seen = max(result.max_running_seen, scheduler.stats()["num_running_reqs"])
        if on_step is not None:
            on_step(scheduler, outputs)

    add_arrivals_and_observe({})
    while pending or scheduler.has_work():
        outputs = run_until_idle(scheduler, runner, on_step=add_arrivals_and_observe)
        for rid, items in outputs.items():
            result.outputs.setdefault(rid, []).extend(items)
        if pending and not scheduler.has_work():
            add_arrivals_and_observe({})
    result.output_ids = {rid: joined_ids(items) for rid, items in result.outputs.items()}
    return result
