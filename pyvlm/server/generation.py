"""Runs a request's choices through the engine: one engine request per
choice, deltas merged in arrival order, engine errors mapped to API errors.

Every engine request is aborted if its consumer goes away (the async
generators' finally blocks run when the handler task is cancelled or the
stream is closed)."""

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, List, Mapping, Optional, Sequence, Tuple, Union

from pyvlm.scheduling.errors import EngineBusyError, EngineDeadError, RequestFailedError
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
    mm_processor_kwargs: Optional[Mapping[str, Any]] = None  # the request's, over the launch's


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


async def build_choices(engine, inputs: Sequence[EngineInput], params: Sequence[dict],
                        prefix: str) -> list:
    """Every choice's engine request, built before any of them runs, so a
    refusal of any (too long, bad image, busy) answers the whole request
    with its status before a stream starts; on a refusal the requests
    already built are discarded."""
    async def build(index: int):
        inp = inputs[index]
        with engine_errors_mapped():
            return await engine.async_build(
                prompt=inp.prompt, sampling_params=params[index],
                image_data=list(inp.images) or None, rid=new_rid(prefix),
                add_special_tokens=inp.add_special_tokens,
                mm_processor_kwargs=inp.mm_processor_kwargs or None)

    tasks = [asyncio.ensure_future(build(i)) for i in range(len(inputs))]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        built = await asyncio.gather(*tasks, return_exceptions=True)
        for request in built:
            if not isinstance(request, BaseException):
                engine.discard(request)
        raise


async def choice_deltas(stream, index: int,
                        timing: Optional[Timing] = None) -> AsyncIterator[ChoiceDelta]:
    """One submitted choice's deltas (an Engine.async_stream); engine errors
    become ApiErrors; leaving early aborts it."""
    try:
        with engine_errors_mapped():
            async for delta in stream:
                yield _choice_delta(delta, index, timing)
    finally:
        await stream.aclose()
        if timing is not None:
            timing.end = time.perf_counter()


def _choice_delta(delta: dict, index: int, timing: Optional[Timing]) -> ChoiceDelta:
    meta = delta["meta_info"]
    if timing is not None and delta["token_ids"] and timing.first_token is None:
        timing.first_token = time.perf_counter()
    finish = meta["finish_reason"]["type"] if delta["finished"] else None
    return ChoiceDelta(index, delta["text"], delta["token_ids"], _new_logprobs(meta),
                       _finish_reason(finish), meta)


@contextlib.contextmanager
def engine_errors_mapped():
    """The engine's errors as API errors (their statuses below)."""
    try:
        yield
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
    streams = await submitted_choices(engine, inputs, params, prefix)

    async def run(index: int) -> ChoiceResult:
        result = ChoiceResult(index)
        async for delta in choice_deltas(streams[index], index, timings[index]):
            result.add(delta)
        return result

    tasks = [asyncio.ensure_future(run(i)) for i in range(len(inputs))]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # one choice failed (or the client left): abort the others too
        await _stop(tasks, streams)


async def merged_deltas(engine, inputs: Sequence[EngineInput], params: Sequence[dict],
                        prefix: str, timings: Sequence[Timing]) -> AsyncIterator[ChoiceDelta]:
    """Every choice's deltas, interleaved as they arrive (streaming). An
    error in any choice is raised here; closing this iterator aborts all."""
    streams = await submitted_choices(engine, inputs, params, prefix)
    if len(streams) == 1:  # nothing to merge: no task and queue hop per delta
        deltas = choice_deltas(streams[0], 0, timings[0])
        try:
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for delta in choice_deltas(streams[index], index, timings[index]):
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
        await _stop(tasks, streams)


async def submitted_choices(engine, inputs, params, prefix: str) -> list:
    """Every choice built (build_choices), then all submitted at once."""
    return [engine.async_stream(r) for r in await build_choices(engine, inputs, params, prefix)]


async def _stop(tasks, streams) -> None:
    """Cancels the choices' tasks and aborts every stream still unfinished
    (a task cancelled before it started never closes its own)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for stream in streams:
        await stream.aclose()
