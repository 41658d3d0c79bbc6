"""Runs a request's choices through the engine: one engine request per
choice, deltas merged in arrival order, engine errors mapped to API errors.

Every engine request is aborted if its consumer goes away (the async
generators' finally blocks run when the handler task is cancelled or the
stream is closed)."""

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, List, Mapping, Optional, Sequence, Tuple, Union

from pyvlm.entrypoints.outputs import output_meta
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
    """What one choice produced since its last delta. meta (the engine's
    meta_info of it) may be given as a function that makes it, called on
    first read: the OpenAI streams read only their last delta's."""

    index: int
    text: str
    token_ids: List[int]
    logprobs: List[TokenLogprob]
    finish_reason: Optional[str]  # "stop" | "length" on the last delta
    _meta: Union[dict, Callable[[], dict]] = field(repr=False, compare=False)

    @property
    def meta(self) -> dict:
        if callable(self._meta):
            self._meta = self._meta()
        return self._meta


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
        if delta.finish_reason is not None:  # the last delta: its meta holds the totals
            self.finish_reason, self.meta = delta.finish_reason, delta.meta


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


class ChoiceDeltas:
    """One submitted choice's deltas (from an Engine.async_stream), in
    batches: each step of the iteration gives the ChoiceDeltas of every
    output that waited (a list of at least one, in order), so a consumer
    that fell behind the engine pays one pass through its stream's
    generators per batch, not per token. Engine errors become ApiErrors;
    aclose() aborts the choice unless it has finished, and may come
    before the first batch. Built from the engine's RequestOutputs
    directly: meta is their meta_info as the engine's SGLang-style deltas
    carry it."""

    def __init__(self, stream, index: int, timing: Optional[Timing] = None):
        self._stream, self._index, self._timing = stream, index, timing
        self._has_logprobs = False  # a logprob came: every meta lists the delta's
        self._is_closed = False
        self._held: list = []  # an aborted end, taken after the outputs before it

    def __aiter__(self) -> "ChoiceDeltas":
        return self

    async def __anext__(self) -> List[ChoiceDelta]:
        if self._is_closed:
            raise StopAsyncIteration
        try:
            outputs = await self._take_outputs()
            finishes = [_finish_reason(out.finish_reason) if out.finished else None
                        for out in outputs]
        except BaseException as exc:  # the end, an error, or the caller cancelled
            await self.aclose()
            mapped = api_error(exc) if isinstance(exc, Exception) else exc
            if mapped is exc:
                raise
            raise mapped from None
        self._stamp_first_token(outputs)
        return [self._delta(out, finish) for out, finish in zip(outputs, finishes)]

    async def _take_outputs(self) -> list:
        """The outputs waiting; an aborted end (an error for the client)
        waits for the next call when text came before it."""
        outputs, self._held = self._held or await self._stream.next_outputs(), []
        if len(outputs) > 1 and outputs[-1].finish_reason == "abort":
            outputs, self._held = outputs[:-1], outputs[-1:]
        return outputs

    def _stamp_first_token(self, outputs) -> None:
        timing = self._timing
        if timing is not None and timing.first_token is None and any(
                out.new_token_ids for out in outputs):
            timing.first_token = time.perf_counter()

    def _delta(self, out, finish: Optional[str]) -> ChoiceDelta:
        logprobs = out.new_logprobs
        self._has_logprobs = self._has_logprobs or bool(logprobs)
        meta = functools.partial(output_meta, self._stream.rid, out,
                                 logprobs if self._has_logprobs else None)
        return ChoiceDelta(self._index, out.new_text, out.new_token_ids,
                           [(int(tid), float(lp), [(int(t), float(v)) for t, v in top])
                            for tid, lp, top in logprobs] if logprobs else [],
                           finish, meta)

    async def aclose(self) -> None:
        """Aborts the choice unless it has finished; stamps timing.end (once)."""
        if self._is_closed:
            return
        self._is_closed = True
        try:
            await self._stream.aclose()
        finally:
            if self._timing is not None:
                self._timing.end = time.perf_counter()


def choice_deltas(stream, index: int, timing: Optional[Timing] = None) -> ChoiceDeltas:
    """One submitted choice's deltas, in batches (ChoiceDeltas)."""
    return ChoiceDeltas(stream, index, timing)


@contextlib.contextmanager
def engine_errors_mapped():
    """The engine's errors as API errors (api_error)."""
    try:
        yield
    except Exception as exc:
        mapped = api_error(exc)
        if mapped is exc:
            raise
        raise mapped from None


def api_error(exc: Exception) -> Exception:
    """An engine error as the API error it answers with: ValueError (the
    engine refused the request: too long, bad image ...) 400; EngineBusyError
    (its budget for queued images is full: shed) 429; EngineDeadError (shut
    down, or stopped by a device failure) 503; RequestFailedError (this
    request alone failed; the engine logged why) 500; a RuntimeError is
    logged here and is a 500. Any other error (an ApiError already,
    StopAsyncIteration) is returned as it is."""
    if isinstance(exc, ValueError):
        return invalid(_client_message(exc))
    if isinstance(exc, EngineBusyError):
        return too_busy(str(exc))
    if isinstance(exc, EngineDeadError):
        return unavailable(f"The engine is not running: {exc}")
    if isinstance(exc, RequestFailedError):
        return ApiError(500, f"Internal server error: {exc}", None, "internal_error")
    if isinstance(exc, RuntimeError):
        logger.error("generation failed", exc_info=exc)
        return internal_error()
    return exc


def _client_message(exc: ValueError) -> str:
    message = str(exc)
    return message if message and len(message) < 1000 else "invalid request"


def _finish_reason(engine_reason: Optional[str]) -> Optional[str]:
    if engine_reason is None:
        return None
    if engine_reason == "abort":
        raise unavailable("The request was aborted (the server is shutting down)")
    return engine_reason


async def collect_choices(engine, inputs: Sequence[EngineInput], params: Sequence[dict],
                          prefix: str, timings: Sequence[Timing]) -> List[ChoiceResult]:
    """Runs every choice concurrently to the end (non-streaming)."""
    streams = await submitted_choices(engine, inputs, params, prefix)

    async def run(index: int) -> ChoiceResult:
        result = ChoiceResult(index)
        async for batch in choice_deltas(streams[index], index, timings[index]):
            for delta in batch:
                result.add(delta)
        return result

    tasks = [asyncio.ensure_future(run(i)) for i in range(len(inputs))]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # one choice failed (or the client left): abort the others too
        await _stop(tasks, streams)


async def merged_deltas(engine, inputs: Sequence[EngineInput], params: Sequence[dict],
                        prefix: str, timings: Sequence[Timing]):
    """Submits every choice and returns their deltas, in batches of one
    choice's (ChoiceDeltas), interleaved as they arrive (streaming): an
    async iterator whose aclose() aborts every choice still running; an
    error in any choice is raised from it. One choice's are its
    ChoiceDeltas (nothing to merge: no task and queue hop per batch)."""
    streams = await submitted_choices(engine, inputs, params, prefix)
    if len(streams) == 1:
        return choice_deltas(streams[0], 0, timings[0])
    return MergedDeltas(streams, timings)


class MergedDeltas:
    """Several choices' batches of deltas in arrival order: a task per
    choice pumps its ChoiceDeltas into one queue. The first error ends it (and is
    raised); so does its end, its caller's cancellation and aclose(),
    each of which cancels the tasks and aborts the choices still running."""

    def __init__(self, streams, timings: Sequence[Timing]):
        self._streams = streams
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.ensure_future(self._pump(choice_deltas(stream, i, timings[i])))
                       for i, stream in enumerate(streams)]
        self._num_open = len(streams)

    async def _pump(self, deltas: ChoiceDeltas) -> None:
        try:
            async for batch in deltas:
                self._queue.put_nowait(batch)
        except Exception as exc:
            self._queue.put_nowait(exc)

    def __aiter__(self) -> "MergedDeltas":
        return self

    async def __anext__(self) -> List[ChoiceDelta]:
        try:
            if not self._num_open:
                raise StopAsyncIteration
            item = await self._queue.get()
            if isinstance(item, Exception):
                raise item
        except BaseException:
            await self.aclose()
            raise
        self._num_open -= item[-1].finish_reason is not None  # (a choice's end ends its batch)
        return item

    async def aclose(self) -> None:
        self._num_open = 0
        await _stop(self._tasks, self._streams)


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
