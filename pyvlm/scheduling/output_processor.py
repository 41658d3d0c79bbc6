"""What happens to a sampled token: stop conditions and streamed deltas."""

from typing import Optional, Tuple, Union

from pyvlm.scheduling.request import Request, RequestOutput
from pyvlm.scheduling.types import SampleResult

FinishState = Tuple[Optional[str], Union[int, str, None]]


def record_sample(request: Request, result: SampleResult, context_length: int) -> None:
    """Appends the sampled token and decides whether the request finished."""
    token_id = result.token_id
    request.output_ids.append(token_id)
    if request.sampling.logprobs:
        request.pending_logprobs.append((token_id, result.logprob, tuple(result.top_logprobs)))
    request.finish_reason, request.matched_stop = _finish_state(request, token_id, context_length)


def _finish_state(request: Request, token_id: int, context_length: int) -> FinishState:
    # A stop token's text is never emitted, so it never reaches the detokenizer.
    if token_id in request.stop_token_ids:
        return "stop", token_id
    stop_string = request.detokenizer.add_token(token_id)
    if stop_string is not None:
        return "stop", stop_string
    if len(request.output_ids) >= request.max_new_tokens or request.num_tokens >= context_length:
        return "length", None
    return None, None


def take_output(request: Request, stream_interval: int) -> Optional[RequestOutput]:
    """The delta since the last output, every stream_interval tokens and
    always once finished (or aborted); None when nothing is due."""
    finished = request.finish_reason is not None
    num_new_tokens = len(request.output_ids) - request.num_streamed_tokens
    if not finished and num_new_tokens < max(stream_interval, 1):
        return None
    return _build_output(request, finished)


def _build_output(request: Request, finished: bool) -> RequestOutput:
    new_token_ids = request.output_ids[request.num_streamed_tokens:]
    request.num_streamed_tokens = len(request.output_ids)
    logprobs, request.pending_logprobs = request.pending_logprobs, []
    return RequestOutput(
        rid=request.rid,
        new_token_ids=new_token_ids,
        new_text=request.detokenizer.take_text(finished=finished),
        finished=finished,
        finish_reason=request.finish_reason,
        matched_stop=request.matched_stop,
        prompt_tokens=len(request.prompt_ids),
        completion_tokens=len(request.output_ids),
        cached_tokens=request.num_cached_tokens,
        new_logprobs=logprobs,
        error=request.error,
    )
