"""Runs a request's choices through the engine: one engine request per
choice, deltas merged in arrival order, engine errors mapped to API errors.

Every engine request is aborted if its consumer goes away (the async
generators' finally blocks run when the handler task is cancelled or the
stream is closed)."""

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, List, Optional, Sequence, Tuple, Union

from pyvlm.engine.errors import EngineBusyError, EngineDeadError, RequestFailedError
from pyvlm.server.errors import ApiError, internal_error, invalid, too_busy, unavailable

logger = logging.getLogger("pyvlm.server")

TokenLogprob = Tuple[int, float, List[Tuple[int, float]]]  # (token id, logprob, top-N)
_rids = itertools.count()


@dataclass(frozen=True)
class EngineInput:
    """What one choice sends to the engine."""

    prompt: Union[str, List[int]]
    images: Sequence[Any] = ()
    add_special_tokens: bool = True


@dataclass
class ChoiceDelta:
    """What one choice produced since its last delta."""

    index: int
    text: str
    token_ids: List[int]
    logprobs: List[TokenLogprob]
    finish_reason: Optional[str]  # "stop" | "length" on the last delta
    meta: dict


@dataclass
class ChoiceResult:
    """A finished choice (non-streaming answers)."""

    index: int
    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    logprobs: List[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    meta: dict = field(default_factory=dict)

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.finish_reason, self.meta = delta.finish_reason or self.finish_reason, delta.meta


class Timing:
    """When a choice started, produced its first token and finished."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first_token: Optional[float] = None
        self.end: Optional[float] = None


def new_rid(prefix: str) -> str:
    return f"{prefix}-{next(_rids)}"


async def choice_deltas(engine, inp: EngineInput, params: dict, index: int, rid: str,
                        timing: Optional[Timing] = None) -> AsyncIterator[ChoiceDelta]:
    """One choice's deltas; engine refusals become ApiErrors."""
    stream = engine.async_generate(prompt=inp.prompt, sampling_params=params,
                                   image_data=list(inp.images) or None, rid=rid,
                                   add_special_tokens=inp.add_special_tokens)
    try:
        async for delta in _engine_errors_mapped(stream):
            meta = delta["meta_info"]
            if timing is not None and delta["token_ids"] and timing.first_token is None:
                timing.first_token = time.perf_counter()
            logprobs = _new_logprobs(meta)
            finish = meta["finish_reason"]["type"] if delta["finished"] else None
            yield ChoiceDelta(index, delta["text"], delta["token_ids"], logprobs,
                              _finish_reason(finish), meta)
    finally:
        await stream.aclose()
        if timing is not None:
            timing.end = time.perf_counter()


async def _engine_errors_mapped(stream) -> AsyncIterator[dict]:
    try:
        async for delta in stream:
            yield delta
    except ValueError as exc:  # the engine refused the request (too long, bad image ...)
        raise invalid(_client_message(exc)) from None
    except EngineBusyError as exc:  # its budget for queued images is full: shed
        raise too_busy(str(exc)) from None
    except EngineDeadError as exc:  # shut down, or stopped by a device failure
        raise unavailable(f"The engine is not running: {exc}") from None
    except RequestFailedError as exc:  # this request alone failed; the engine logged why
        raise ApiError(500, f"Internal server error: {exc}", None, "internal_error") from None
    except RuntimeError:
        logger.exception("generation failed")
        raise internal_error() from None


def _client_message(exc: ValueError) -> str:
    message = str(exc)
    return message if message and len(message) < 1000 else "invalid request"


def _finish_reason(engine_reason: Optional[str]) -> Optional[str]:
    if engine_reason is None:
        return None
    if engine_reason == "abort":
        raise unavailable("The request was aborted (the server is shutting down)")
    return engine_reason


def _new_logprobs(meta: dict) -> List[TokenLogprob]:
    """The logprobs of a delta's new tokens (the engine's delta meta lists only those)."""
    chosen = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or []
    return [(int(tid), float(lp), [(int(t), float(v)) for t, v in top])
            for (lp, tid), top in zip(chosen, tops)]


async def collect_choices(engine, inputs: Sequence[EngineInput], params: Sequence[dict],
                          prefix: str, timings: Sequence[Timing]) -> List[ChoiceResult]:
    """Runs every choice concurrently to the end (non-streaming)."""
    async def run(index: int) -> ChoiceResult:
        result = ChoiceResult(index)
        async for delta in choice_deltas(engine, inputs[index], params[index], index,
                                         new_rid(prefix), timings[index]):
            result.add(delta)
        return result

    tasks = [asyncio.ensure_future(run(i)) for i in range(len(inputs))]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # one choice failed (or the client left): abort the others too
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merged_deltas(engine, inputs: Sequence[EngineInput], params: Sequence[dict],
                        prefix: str, timings: Sequence[Timing]) -> AsyncIterator[ChoiceDelta]:
    """Every choice's deltas, interleaved as they arrive (streaming). An
    error in any choice is raised here; closing this iterator aborts all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for delta in choice_deltas(engine, inputs[index], params[index], index,
                                             new_rid(prefix), timings[index]):
                queue.put_nowait(delta)
        except Exception as exc:
            queue.put_nowait(exc)

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(inputs))]
    try:
        num_open = len(tasks)
        while num_open:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            num_open -= item.finish_reason is not None
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
