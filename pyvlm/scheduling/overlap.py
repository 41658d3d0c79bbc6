"""Overlap scheduling (SGLang's overlap scheduler, mini-sglang's overlap
loop): while the device runs decode step N, the host plans and launches
step N+1 and only then reads N's tokens, so the device never waits for the
host's bookkeeping, detokenization and output delivery.

Step N+1 is planned as if N finished no request: every request of N that
N cannot end by length decodes one more token, fed FUTURE_TOKEN (the runner
takes N's sample on the device), at the next position, with its page
reserved without preemption. A request that N ends by a stop token or
string, or that is aborted meanwhile, has run one token too many: that
result is dropped and the KV written for it lies past the request's
computed tokens, in a page no prefix-cache entry covers. The loop goes
back to plain steps (draining the step in flight first) whenever requests
wait for admission or a request is mid-chunk, and when pages run short.
"""

from dataclasses import dataclass
from typing import Any, List

from pyvlm.scheduling.future_tokens import FUTURE_TOKEN
from pyvlm.scheduling.request import Request, RequestStatus
from pyvlm.scheduling.types import ForwardBatch, SequenceChunk


@dataclass
class InFlight:
    """A launched decode step whose results are not read yet."""

    step: Any  # the scheduler's StepPlan (its decodes are the batch's requests)
    batch: ForwardBatch
    launched: Any  # the runner's LaunchedStep: wait() -> results


def ends_by_length(request: Request, context_length: int) -> bool:
    """Whether the token the request samples next is its last one by
    max_new_tokens or the context (stop tokens and strings are not known
    before the token is)."""
    return (len(request.output_ids) + 1 >= request.max_new_tokens
            or request.num_tokens + 1 >= context_length)


def next_decode_chunk(request: Request, cross_images) -> SequenceChunk:
    """The request's decode chunk of the step after the one in flight: its
    token is the one that step samples (FUTURE_TOKEN), one position on."""
    position = request.num_computed_tokens + 1
    return SequenceChunk(
        rid=request.rid,
        token_ids=[FUTURE_TOKEN],
        start_pos=position,
        positions=request.positions(position, position + 1),
        page_table=request.page_table,
        mm_items=[],
        sample=True,
        sampling=request.sampling,
        seed=request.seed,
        step=len(request.output_ids) + 1,
        prompt_ids=request.prompt_ids,
        output_ids=request.output_ids,
        cross_images=cross_images,
    )


def is_still_running(request: Request) -> bool:
    """Whether a request of a launched step is still running when its
    results come (not finished, failed or aborted in between)."""
    return request.status == RequestStatus.RUNNING


def continuing(requests: List[Request], context_length: int) -> List[Request]:
    """The requests of the step in flight that decode again in the next one."""
    return [r for r in requests if is_still_running(r) and not ends_by_length(r, context_length)]
