"""Dispatching a request's choices (a Run) to the engine as one unit:
admission against the queue limit, the choices' engine requests run
concurrently, metrics when each choice ends, and the release of its slots
however it ends (finished, failed, client gone)."""

from dataclasses import dataclass, field
from typing import AsyncIterator, List, Optional, Sequence

from pyvlm.server.errors import too_busy
from pyvlm.server.generation import (ChoiceDelta, ChoiceResult, EngineInput, Timing,
                                     collect_choices, merged_deltas)
from pyvlm.server.params import AnswerSpec, choice_sampling


@dataclass
class Run:
    """prompts[p] gets spec.n choices, numbered p * n + i."""

    prompts: Sequence[EngineInput]
    sampling: dict
    spec: AnswerSpec
    rid_prefix: str
    ticket: Optional["Ticket"] = None  # slots admitted before its images were fetched
    timings: List[Timing] = field(default_factory=list)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.spec.n

    def prompt_index(self, choice_index: int) -> int:
        return choice_index // self.spec.n

    def choice_inputs(self) -> List[EngineInput]:
        return [self.prompts[self.prompt_index(i)] for i in range(self.num_choices)]

    def choice_params(self) -> List[dict]:
        return [choice_sampling(self.sampling, self.spec, i) for i in range(self.num_choices)]


class Admission:
    """Counts choices in flight; refuses (429) beyond running + queued limits."""

    def __init__(self, max_running: int, max_queued):
        self.max_in_flight = None if max_queued is None else max_running + max_queued
        self.num_in_flight = 0

    def acquire(self, num: int) -> "Ticket":
        if self.max_in_flight is not None and self.num_in_flight + num > self.max_in_flight:
            raise too_busy()
        self.num_in_flight += num
        return Ticket(self, num)


class Ticket:
    """num admitted slots; release() gives them back once (later calls do nothing)."""

    def __init__(self, admission: Admission, num: int):
        self._admission, self._num = admission, num

    def release(self) -> None:
        self._admission.num_in_flight -= self._num
        self._num = 0


class Dispatcher:
    """Sends each Run's choices to one engine, admitted and released through
    its Admission, recording metrics (see the module docstring)."""

    def __init__(self, engine, admission: Admission, metrics):
        self.engine, self.admission, self.metrics = engine, admission, metrics

    def admit(self, run: Run) -> Ticket:
        return run.ticket or self.admission.acquire(run.num_choices)

    async def collect(self, run: Run) -> List[ChoiceResult]:
        ticket = self.admit(run)
        run.timings = [Timing() for _ in range(run.num_choices)]
        results: List[ChoiceResult] = []
        try:
            results = await collect_choices(self.engine, run.choice_inputs(), run.choice_params(),
                                            run.rid_prefix, run.timings)
            return results
        finally:
            ticket.release()
            self._record(run, {r.index: r.meta for r in results})

    async def stream(self, run: Run) -> AsyncIterator[List[ChoiceDelta]]:
        """Deltas of every choice, in batches of one choice's (ChoiceDeltas);
        closing the iterator aborts the rest."""
        ticket = self.admit(run)
        run.timings = [Timing() for _ in range(run.num_choices)]
        metas = {}
        deltas = None
        try:
            deltas = await merged_deltas(self.engine, run.choice_inputs(), run.choice_params(),
                                         run.rid_prefix, run.timings)
            async for batch in deltas:
                last = batch[-1]  # (a choice's end ends its batch)
                if last.finish_reason is not None:
                    metas[last.index] = last.meta
                yield batch
        finally:
            if deltas is not None:
                await deltas.aclose()
            ticket.release()
            self._record(run, metas)

    def _record(self, run: Run, metas: dict) -> None:
        counted_prompts = set()  # n choices share their prompt: count it once
        for index, timing in enumerate(run.timings):
            meta, prompt = metas.get(index), run.prompt_index(index)
            self.metrics.on_choice(timing, meta, prompt not in counted_prompts)
            if meta is not None:
                counted_prompts.add(prompt)
