"""Overlap scheduling (SGLang's overlap scheduler, mini-sglang's overlap
loop): while the device runs step N (decode, prefill or mixed), the host
plans and launches step N+1 and only then reads N's tokens, so the device
never waits for the host's bookkeeping, detokenization and output delivery.

Step N+1 is planned by the planner of plain steps (decodes, the continuing
chunk, admissions under the budgets), from the Frontier that N leaves with
its outcome unknown:

- a request N samples (a decode, or its prompt's last chunk) and cannot
  end by length decodes in N+1, fed FUTURE_TOKEN (the runner takes N's
  sample on the device) at position num_tokens, the token N samples; its
  rotary positions are the request's own, its page is reserved;
- a request mid-prompt in N continues with its next chunk (N samples
  nothing for it);
- admissions see the pool as it is: pages N's finishers will free are not
  counted yet (conservative, never wrong);
- images whose K/V a request's chunk in N writes are not written again by
  its chunk in N+1.

Pages for N+1 are taken without preemption: when the decodes' pages do not
fit (and no prefill does), N is read first and the next step is planned
plainly, which may preempt (preemption needs a drained pipeline). A step
whose launch raises runs plainly once N is read (isolating the failure).
A request that N ends by a stop token or string, or fails, or that is
aborted meanwhile, has run one step too many in N+1: that result is
dropped, and the KV written for it lies past the request's computed
tokens, in a page no prefix-cache entry covers. Pages freed while a step
is in flight are only written by later steps, which the device runs after
it.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from pyvlm.scheduling.request import Request, RequestStatus
from pyvlm.scheduling.types import ForwardBatch


@dataclass
class Frontier:
    """Where the next step starts. running: the requests that decode in it;
    chunked: the request mid-prompt; num_unread: per request, the tokens a
    launched step computes whose results the host has not read (none on the
    plain path)."""

    running: List[Request]
    chunked: Optional[Request]
    num_unread: Mapping[Request, int] = field(default_factory=dict)

    def start_of(self, request: Request) -> int:
        """The position of the request's next token to run; num_tokens when
        that token is the one the step in flight samples (FUTURE_TOKEN)."""
        return request.num_computed_tokens + self.num_unread.get(request, 0)


@dataclass
class InFlight:
    """A launched step whose results are not read yet."""

    step: Any  # the scheduler's StepPlan: its items are the batch's chunks, in order
    batch: ForwardBatch
    launched: Any  # the runner's LaunchedStep: wait() -> results
    num_tokens: Dict[Request, int] = field(init=False)  # each request's tokens in the step

    def __post_init__(self):
        self.num_tokens = {request: n for request, n in self.step.items}


def frontier_after(flight: InFlight, running: List[Request], chunked: Optional[Request],
                   context_length: int) -> Frontier:
    """The frontier of the step after the one in flight (module docstring):
    running and chunked are the scheduler's queues, not yet updated by it."""
    frontier = Frontier([], None, flight.num_tokens)

    def decodes_next(request: Request) -> bool:
        return (is_still_running(request) and frontier.start_of(request) == request.num_tokens
                and not ends_by_length(request, context_length))

    # every running request the step ran is one of its decodes (and samples)
    frontier.running = [r for r in running if r not in flight.num_tokens or decodes_next(r)]
    frontier.running += [r for r, _ in flight.step.prefill.items if decodes_next(r)]
    if chunked is not None and frontier.start_of(chunked) < chunked.num_tokens:
        frontier.chunked = chunked
    return frontier


def ends_by_length(request: Request, context_length: int) -> bool:
    """Whether the token the request samples next is its last one by
    max_new_tokens or the context (stop tokens and strings are not known
    before the token is)."""
    return (len(request.output_ids) + 1 >= request.max_new_tokens
            or request.num_tokens + 1 >= context_length)


def is_still_running(request: Request) -> bool:
    """Whether a request of a launched step is still running when its
    results come (not finished, failed or aborted in between)."""
    return request.status is RequestStatus.RUNNING
