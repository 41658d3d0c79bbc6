"""POST /v1/chat/completions and POST /v1/completions."""

import logging
from typing import AsyncIterator, List, Mapping, Union

import orjson

from pyvlm.http.sse import SSE_DONE, sse_json
from pyvlm.http.types import Response, StreamingResponse
from pyvlm.server import chat_request, fields, responses
from pyvlm.server.errors import ApiError, internal_error, invalid, unsupported_field
from pyvlm.server.generation import ChoiceDelta, EngineInput
from pyvlm.server.params import SAMPLING_FIELDS, answer_spec, check_model, sampling_params
from pyvlm.server.dispatch import Run

logger = logging.getLogger("pyvlm.server")

Answer = Union[Response, StreamingResponse]
COMPLETION_FIELDS = SAMPLING_FIELDS + ("prompt", "logprobs", "echo", "suffix", "best_of")


def json_response(obj, status: int = 200) -> Response:
    return Response(status, orjson.dumps(obj))


# ---- chat -----------------------------------------------------------------

async def chat_completions(app, body: Mapping) -> Answer:
    chat_request.refuse_unimplemented(body)
    check_model(body, app.args.model_name)
    messages = chat_request.check_messages(body, app.args.limit_mm_per_prompt)
    spec = answer_spec(body, chat_request.num_top_logprobs(body))
    rendered = app.render_chat(messages)
    sampling = sampling_params(body, chat_request.max_tokens(body), app.context_length,
                               app.vocab_size, tuple(rendered.stop))
    images, ticket = await app.admit_and_fetch(rendered.image_refs, spec.n)
    run = Run([EngineInput(rendered.text, images, True,
                           fields.get_object(body, "mm_processor_kwargs"))],
              sampling, spec, "chatcmpl", ticket)
    ids = responses.ResponseIds("chatcmpl", app.args.model_name)
    return await respond(app, run, spec, ids, chat_events, responses.chat_completion)


async def respond(app, run: Run, spec, ids, make_events, make_body):
    """The stream (SSE events from make_events) or the whole JSON body (make_body)."""
    if spec.stream:
        deltas = await open_stream(app.dispatcher.stream(run))
        return event_stream(make_events(app, run, ids, deltas), deltas)
    results = await app.dispatcher.collect(run)
    usage = responses.usage_of([(run.prompt_index(r.index), r.meta) for r in results],
                               app.args.enable_cache_report)
    return json_response(make_body(ids, results, usage, app.token_texts,
                                   spec.num_top_logprobs is not None))


def chat_events(app, run: Run, ids, deltas) -> AsyncIterator[bytes]:
    """chat.completion.chunk events: role first, content, one finish per
    choice; the events of a batch of deltas (Dispatcher.stream) go out as
    one body chunk."""
    return ChatEvents(app, run, ids).of_stream(deltas)


class StreamEvents:
    """The SSE events of one OpenAI stream's deltas: each batch of deltas
    as one body chunk, then the usage chunk when asked for. Subclasses
    give the events of one delta (_add) and the chunks' object name."""

    OBJECT = ""

    def __init__(self, app, run: Run, ids):
        self.app, self.run, self.ids = app, run, ids
        self.with_usage = run.spec.include_usage
        self.with_logprobs = run.spec.num_top_logprobs is not None
        self.metas = []  # (prompt index, meta) of each finished choice

    async def of_stream(self, deltas) -> AsyncIterator[bytes]:
        async for batch in deltas:
            yield self.of_batch(batch)
        if self.with_usage:
            usage = responses.usage_of(self.metas, self.app.args.enable_cache_report)
            yield sse_json(responses.usage_chunk(self.ids, self.OBJECT, usage))

    def of_batch(self, batch: List[ChoiceDelta]) -> bytes:
        events: List[bytes] = []
        for delta in batch:
            if delta.finish_reason is not None:
                self.metas.append((self.run.prompt_index(delta.index), delta.meta))
            self._add(delta, events)
        return b"".join(events)

    def _add(self, delta: ChoiceDelta, events: List[bytes]) -> None:
        raise NotImplementedError


class ChatEvents(StreamEvents):
    """A chat stream's events (see chat_events)."""

    OBJECT = "chat.completion.chunk"

    def __init__(self, app, run: Run, ids):
        super().__init__(app, run, ids)
        self.started = set()
        self.text_events = responses.TextEvents(lambda index, text: responses.chat_chunk(
            ids, index, {"content": text}, include_usage=self.with_usage))

    def _add(self, delta: ChoiceDelta, events: List[bytes]) -> None:
        ids, index = self.ids, delta.index
        if index not in self.started:
            self.started.add(index)
            events.append(sse_json(responses.chat_chunk(
                ids, index, {"role": "assistant", "content": ""}, include_usage=self.with_usage)))
        if self.with_logprobs and (delta.text or delta.logprobs):
            logprobs = responses.chat_logprobs(delta.logprobs, self.app.token_texts)
            events.append(sse_json(responses.chat_chunk(
                ids, index, {"content": delta.text}, logprobs=logprobs,
                include_usage=self.with_usage)))
        elif delta.text:
            events.append(self.text_events.event(index, delta.text))
        if delta.finish_reason is not None:
            events.append(sse_json(responses.chat_chunk(
                ids, index, {}, delta.finish_reason, include_usage=self.with_usage)))


# ---- completions ----------------------------------------------------------

async def completions(app, body: Mapping) -> Answer:
    fields.check_known(body, COMPLETION_FIELDS)
    _refuse_completion_extras(body)
    check_model(body, app.args.model_name)
    prompts = completion_prompts(body.get("prompt"), app.vocab_size)
    spec = answer_spec(body, fields.get_sampling(body, "logprobs", "top_logprobs"))
    sampling = sampling_params(body, fields.get_sampling(body, "max_tokens", "max_new_tokens"),
                               app.context_length, app.vocab_size)
    run = Run([EngineInput(p, (), True) for p in prompts], sampling, spec, "cmpl")
    ids = responses.ResponseIds("cmpl", app.args.model_name)
    return await respond(app, run, spec, ids, completion_events, responses.completion)


def _refuse_completion_extras(body: Mapping) -> None:
    if body.get("echo"):
        raise unsupported_field("echo")
    if body.get("suffix") is not None:
        raise unsupported_field("suffix")
    if body.get("best_of") not in (None, 1, body.get("n", 1)):
        raise unsupported_field("best_of")


def completion_prompts(prompt, vocab_size: int) -> List[Union[str, List[int]]]:
    """A string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif fields.is_token_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or fields.is_token_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise invalid("'prompt' must be a string, a list of strings, a list of token ids or "
                      "a list of such lists (not empty)", "prompt")
    if any(isinstance(p, list) and max(p) >= vocab_size for p in prompts):
        raise invalid(f"'prompt' has a token id outside the vocabulary (size {vocab_size})",
                      "prompt")
    return prompts


def completion_events(app, run: Run, ids, deltas) -> AsyncIterator[bytes]:
    """text_completion chunks, the finish_reason on each choice's last one;
    the events of a batch of deltas go out as one body chunk."""
    return CompletionEvents(app, run, ids).of_stream(deltas)


class CompletionEvents(StreamEvents):
    """A completion stream's events (see completion_events)."""

    OBJECT = "text_completion"

    def __init__(self, app, run: Run, ids):
        super().__init__(app, run, ids)
        self.offsets = {}  # each choice's text length so far (logprobs' text_offset)
        self.text_events = responses.TextEvents(lambda index, text: responses.completion_text_chunk(
            ids, index, text, None, None, self.with_usage))

    def _add(self, delta: ChoiceDelta, events: List[bytes]) -> None:
        if not self.with_logprobs and delta.finish_reason is None:
            events.append(self.text_events.event(delta.index, delta.text))
            return
        logprobs = None
        if self.with_logprobs:
            offset = self.offsets.get(delta.index, 0)
            logprobs = responses.completion_logprobs(delta.logprobs, self.app.token_texts, offset)
            self.offsets[delta.index] = offset + len(delta.text)
        events.append(sse_json(responses.completion_chunk(self.ids, delta, logprobs,
                                                          self.with_usage)))


# ---- streaming plumbing ---------------------------------------------------

async def open_stream(deltas: AsyncIterator[List[ChoiceDelta]]) -> "PrimedDeltas":
    """Waits for the first batch of deltas, so refusals (queue full, prompt
    too long) still get a status code; returns an iterator that replays it."""
    try:
        first = await deltas.__anext__()
    except StopAsyncIteration:
        raise internal_error() from None
    except BaseException:
        await deltas.aclose()
        raise
    return PrimedDeltas(first, deltas)


class PrimedDeltas:
    """The first batch of deltas, then the rest; aclose() always closes the
    source (an async generator never started would skip its finally blocks)."""

    def __init__(self, first: List[ChoiceDelta], source):
        self._first, self._source = first, source

    def __aiter__(self) -> "PrimedDeltas":
        return self

    async def __anext__(self) -> List[ChoiceDelta]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._source.__anext__()

    async def aclose(self) -> None:
        self._first = None
        await self._source.aclose()


class EventStream:
    """A StreamingResponse body: the events, then `data: [DONE]`; a failure
    mid-stream becomes an `error` event and the stream ends there. When the
    events end, fail or are closed (client gone, even before the first
    read), the deltas close too, which aborts the engine requests at once
    (before an error event goes out). One object, not a generator per
    duty: every event of every stream passes through it."""

    def __init__(self, events: AsyncIterator[bytes], deltas: PrimedDeltas):
        self._events, self._deltas = events, deltas
        self._is_done = False

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> bytes:
        if self._is_done:
            raise StopAsyncIteration
        try:
            return await self._events.__anext__()
        except StopAsyncIteration:
            await self.aclose()
            return SSE_DONE
        except ApiError as exc:
            await self.aclose()
            return sse_json(exc.body(), event="error")
        except Exception:
            await self.aclose()
            logger.exception("stream failed")
            return sse_json(internal_error().body(), event="error")
        except BaseException:  # cancelled: the protocol closes the body next
            await self.aclose()
            raise

    async def aclose(self) -> None:
        self._is_done = True
        try:
            await self._events.aclose()
        finally:
            await self._deltas.aclose()


def event_stream(events: AsyncIterator[bytes], deltas: PrimedDeltas) -> StreamingResponse:
    return StreamingResponse(200, EventStream(events, deltas),
                             headers=[("cache-control", "no-cache"), ("x-accel-buffering", "no")])
