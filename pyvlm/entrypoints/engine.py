"""pyvlm.Engine: offline generation without HTTP (the server drives the same
engine). The model runs on its own thread, or in an engine process of its
own (engine_process; pyvlm/entrypoints/engine_core.py); generate() blocks
the caller, async_generate() yields deltas without blocking the event loop."""

import asyncio
import collections
import functools
import logging
import queue
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Sequence, Union

from pyvlm.chat import ChatTemplate
from pyvlm.config import EngineConfig, engine_config
from pyvlm.scheduling.errors import EngineBusyError, EngineDeadError, RequestFailedError
from pyvlm.scheduling.request import Request, RequestOutput
from pyvlm.entrypoints.loop_deliveries import deliveries_for
from pyvlm.entrypoints.outputs import OutputAccumulator
from pyvlm.entrypoints.sampling import sampling_params_from

logger = logging.getLogger("pyvlm.engine")

Prompt = Union[str, List[int]]


class Engine:
    """Loads a model and serves generate calls (SGLang's Engine API).

    Engine(model="dir or hub id", page_size=16, chunked_prefill_size=512, ...)
    takes the server's argument names; model None loads the demo model.

    Chat messages take the server's path: they are rendered by the engine's
    chat_template (the one the server serves with: chat_template= a named
    template or a Jinja file, else the checkpoint's Jinja template, else the
    architecture's default), its stop strings are added to the request's,
    and the text is tokenized with the tokenizer's special tokens. Content
    parts are OpenAI's text and image_url ({"url": a URL, data URI or
    path}) parts, plus {"type": "image", "image": <a PIL image, bytes, or
    any of those strings>} for images already in memory.

    Images (image_data, or a message's image parts) go through the server's
    media policy: PIL images and bytes are taken as given; URLs on private
    or loopback addresses are refused unless allow_private_media_urls=True;
    paths and file:// URLs are read only under allowed_local_media_path.
    A refusal is a ValueError (MediaError) naming the image, with the
    server's text for the same image.

    engine_process: "thread" runs the scheduler and the model on a thread
    of this process; "process" in a process of its own, started with the
    spawn method (a script doing so needs an `if __name__ == "__main__":`
    guard), while tokenization and images stay here; "auto" (default):
    process on CUDA, thread on CPU. If that process dies, requests fail
    with EngineDeadError and health() says why. loaded_model needs "thread".
    """

    def __init__(self, model: Optional[str] = None, loaded_model=None, **server_args):
        from pyvlm.entrypoints.startup import start_engine

        self.config: EngineConfig = engine_config(model=model, **server_args)
        self.state = start_engine(self.config, loaded_model)
        self.builder, self.step_loop = self.state.builder, self.state.step_loop

    # -- sync API --------------------------------------------------------
    def generate(self, prompt: Union[Prompt, Sequence[Prompt], None] = None,
                 sampling_params: Union[Mapping, Sequence[Mapping], None] = None,
                 image_data: Any = None, messages: Any = None,
                 mm_processor_kwargs: Optional[Mapping[str, Any]] = None
                 ) -> Union[dict, List[dict]]:
        """Generates for one prompt (or chat) or a batch; returns SGLang-style
        dicts {"text", "output_ids", "meta_info"} (a list for a batch).
        mm_processor_kwargs: image-processor settings over the launch's, for
        every prompt of the call (keys are the model family's, e.g. "max_pixels")."""
        builds, single = self._batch_builds(prompt, sampling_params, image_data, messages,
                                            mm_processor_kwargs)
        submitted = []
        try:
            for build in builds:  # each request runs while the next one is built
                request = build()
                submitted.append((request, self._submit_sync(request)))
            results = [self._collect_sync(r, q) for r, q in submitted]
        except BaseException:
            for request, _ in submitted:
                self.step_loop.abort(request.rid)
            raise
        return results[0] if single else results

    # -- async API -------------------------------------------------------
    async def async_generate(self, prompt: Optional[Prompt] = None,
                             sampling_params: Optional[Mapping] = None, image_data: Any = None,
                             messages: Any = None, rid: Optional[str] = None,
                             add_special_tokens: bool = False) -> AsyncIterator[dict]:
        """Async iterator of deltas {"text", "token_ids", "finished",
        "meta_info"} for one request; leaving the loop early aborts it.

        rid names the request (abort(rid)); add_special_tokens applies the
        tokenizer's post-processing (e.g. a Llama BOS) to a text prompt, as
        the OpenAI server does, without ever doubling a BOS the text holds.
        A delta's meta_info lists the logprobs of its new tokens only.
        """
        request = await self.async_build(prompt, sampling_params, image_data, messages, rid,
                                         add_special_tokens)
        stream = self.async_stream(request)
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()

    async def async_build(self, prompt: Optional[Prompt] = None,
                          sampling_params: Optional[Mapping] = None, image_data: Any = None,
                          messages: Any = None, rid: Optional[str] = None,
                          add_special_tokens: bool = False,
                          mm_processor_kwargs: Optional[Mapping[str, Any]] = None) -> Request:
        """The request async_generate would run, built off the event loop
        (tokenizing, images) without running it: every refusal (ValueError,
        EngineBusyError) comes here. Run it with async_stream, or discard()
        it; it holds image budget until one of them. It never waits for the
        image budget (a full one is EngineBusyError), and a request built
        after its caller was cancelled gives its budget back.
        mm_processor_kwargs: image-processor settings of this request over
        the launch's (keys are the model family's, e.g. "max_pixels")."""
        build = asyncio.get_running_loop().run_in_executor(None, functools.partial(
            self._build_one, prompt, sampling_params, image_data, messages, rid,
            add_special_tokens, wait=False, mm_processor_kwargs=mm_processor_kwargs))
        try:
            return await asyncio.shield(build)
        except asyncio.CancelledError:
            build.add_done_callback(self._release_built)
            raise

    def async_stream(self, request: Request) -> "DeltaStream":
        """Submits a request from async_build now; its deltas come from the
        returned async iterator (call its aclose() when leaving early)."""
        return DeltaStream(self, request)

    def discard(self, request: Request) -> None:
        """Gives back what a built request that will never run holds."""
        self.builder.release(request)

    def _release_built(self, build: "asyncio.Future") -> None:
        if not build.cancelled() and build.exception() is None:
            self.builder.release(build.result())

    def abort(self, rid: str) -> None:
        self.step_loop.abort(rid)

    def health(self) -> Optional[str]:
        """None while the engine serves; else why it stopped (shut down, or
        a fatal device error: the process should then be restarted)."""
        if self.step_loop.is_alive():
            return None
        return self.step_loop.failure or "the engine is not running"

    def step_running_for(self) -> Optional[float]:
        """Seconds the engine's current step has run (None between steps);
        read without waiting for the engine thread, so a hung step shows."""
        return self.step_loop.step_running_for()

    def token_texts(self, token_ids: Sequence[int]) -> List[str]:
        """Each token's own decoded text (logprob entries show these)."""
        tokenizer = self.state.tokenizer
        return [tokenizer.decode([int(t)], skip_special_tokens=False) for t in token_ids]

    @property
    def chat_template(self) -> ChatTemplate:
        """The pyvlm.chat ChatTemplate that messages are rendered with, here
        and by the server over this engine (resolved once, at startup)."""
        return self.state.chat_template

    def model_info(self) -> Dict[str, Any]:
        """What the server reports and needs: paths, architectures, context
        length, image token."""
        files, builder = self.state.files, self.builder
        return {"model_path": self.config.model.model or str(files.root),
                "tokenizer_path": str(files.tokenizer_dir),
                "architectures": list(files.config.get("architectures") or []),
                "context_length": self.state.context_length,
                "image_token": builder.image_token, "is_demo": self.state.is_demo,
                "page_size": self.config.cache.page_size,
                "vocab_size": (files.config.get("text_config") or files.config).get(
                    "vocab_size") or len(self.state.tokenizer)}

    def flush_cache(self) -> bool:
        """Empties the prefix and encoder caches when no request is running."""
        return bool(self._core_command("flush_cache"))

    def get_stats(self) -> Dict[str, float]:
        return dict(self._core_command("stats"))

    def dump_engine_stacks(self) -> None:
        """Writes the engine process's thread stacks to its stderr (the
        server's watchdog, on a hung step); with the engine on a thread of
        this process, this process's own dump shows it and nothing is done."""
        if self.state.core is None:
            self.step_loop.dump_stacks()

    def shutdown(self) -> None:
        self.step_loop.stop()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- helpers ---------------------------------------------------------
    def _core_command(self, name: str):
        """Runs the core's command `name` (startup.CORE_COMMANDS) between
        steps, in whichever process the core is."""
        if self.state.core is None:
            return self.step_loop.command(name)
        return self.step_loop.call(getattr(self.state.core, name))

    def _build_one(self, prompt, sampling_params, image_data, messages, rid=None,
                   add_special_tokens=False, wait=True, mm_processor_kwargs=None) -> Request:
        request = self._build_request(prompt, sampling_params, image_data, messages, rid,
                                      add_special_tokens, wait, mm_processor_kwargs)
        if self.state.core is None:  # its pixels will go to the engine process
            from pyvlm.entrypoints.core_messages import move_to_shared_memory

            try:
                move_to_shared_memory(request)
            except BaseException:
                self.builder.release(request)
                raise
        return request

    def _build_request(self, prompt, sampling_params, image_data, messages, rid,
                       add_special_tokens, wait, mm_processor_kwargs) -> Request:
        sampling = sampling_params_from(sampling_params, self.state.sampling_defaults)
        if messages is not None:
            return self.builder.from_messages(messages, sampling, rid, wait=wait,
                                              mm_processor_kwargs=mm_processor_kwargs)
        if prompt is None:
            raise ValueError("give a prompt or messages")
        images = [] if image_data is None else (
            list(image_data) if isinstance(image_data, (list, tuple)) else [image_data])
        return self.builder.from_prompt(prompt, images, sampling, rid,
                                        add_special_tokens=add_special_tokens, wait=wait,
                                        mm_processor_kwargs=mm_processor_kwargs)

    def _batch_builds(self, prompt, sampling_params, image_data, messages,
                      mm_processor_kwargs=None):
        """(one request-building callable per prompt, whether the input was one prompt)."""
        batch_input = messages if messages is not None else prompt
        single = not _is_batch(batch_input, is_messages=messages is not None)
        items = [batch_input] if single else list(batch_input)
        params = _per_item(sampling_params, len(items), Mapping)
        images = [image_data] if single else _per_item(image_data, len(items), None)
        settings = dict(mm_processor_kwargs=mm_processor_kwargs)
        if messages is not None:
            return [functools.partial(self._build_one, None, p, None, m, **settings)
                    for m, p in zip(items, params)], single
        return [functools.partial(self._build_one, x, p, im, None, **settings)
                for x, p, im in zip(items, params, images)], single

    def _submit(self, request: Request, sink) -> None:
        """Hands the request to the engine; its image budget is given back
        as soon as the engine is done with it (its final output or error:
        the engine sends one for every request, aborted ones included)."""
        def sink_releasing(out, err):
            if err is not None or out.finished:
                self.builder.release(request)
            sink(out, err)

        self.step_loop.submit(request, sink_releasing)

    def _submit_sync(self, request: Request) -> "queue.Queue":
        outputs: "queue.Queue" = queue.Queue()
        self._submit(request, lambda out, err: outputs.put((out, err)))
        return outputs

    def _collect_sync(self, request: Request, outputs: "queue.Queue") -> dict:
        accumulator = OutputAccumulator(request)
        while True:
            out, err = self.step_loop.wait(outputs)
            if err is not None:
                raise _user_error(err)
            accumulator.delta(out)
            if out.finished:
                return accumulator.result()


class DeltaStream:
    """A submitted request's deltas, as async_generate yields them. aclose()
    aborts the request unless it has finished (the engine then sends its
    final output, which gives its image budget back).

    next_output() gives the engine's RequestOutput deltas themselves (the
    server formats its own answers from them). Outputs wait in a deque,
    and a future exists only while the consumer waits: an asyncio.Queue's
    bookkeeping cost more than the rest of a delta's way here."""

    def __init__(self, engine: Engine, request: Request):
        self._engine, self._request = engine, request
        self._loop = asyncio.get_running_loop()
        self._deliveries = deliveries_for(self._loop)
        self._outputs: collections.deque = collections.deque()  # (output, error), not taken
        self._waiter: Optional[asyncio.Future] = None
        self._accumulator = OutputAccumulator(request)
        self._finished = False
        engine._submit(request, self._sink)

    @property
    def rid(self) -> str:
        return self._request.rid

    def _sink(self, out, err) -> None:
        self._deliveries.put(self._put, (out, err))

    def _put(self, item) -> None:
        """On the loop's thread (LoopDeliveries)."""
        self._outputs.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> "DeltaStream":
        return self

    async def __anext__(self) -> dict:
        return self._accumulator.delta(await self.next_output())

    async def next_output(self) -> RequestOutput:
        """The next RequestOutput delta; the engine's error is raised as
        __anext__ raises it; StopAsyncIteration after the last."""
        await self._wait_for_output()
        return self._take_output()

    async def next_outputs(self) -> List[RequestOutput]:
        """The RequestOutput deltas waiting (at least one, in order): a
        consumer that fell behind the engine (a step of 64 streams hands
        the loop 64 outputs at once) takes them in one call, not one await
        each. An error is raised as next_output raises it, once the
        outputs before it are taken; StopAsyncIteration after the last."""
        await self._wait_for_output()
        outputs = [self._take_output()]
        waiting = self._outputs
        while waiting and waiting[0][1] is None and not self._finished:
            outputs.append(self._take_output())
        return outputs

    async def _wait_for_output(self) -> None:
        if self._finished:
            raise StopAsyncIteration
        while not self._outputs:
            self._waiter = self._loop.create_future()
            await self._waiter

    def _take_output(self) -> RequestOutput:
        out, err = self._outputs.popleft()
        if err is not None:
            self._finished = True  # the engine is done with it
            raise _user_error(err)
        self._finished = out.finished
        return out

    async def aclose(self) -> None:
        if not self._finished:
            self._finished = True
            self._engine.step_loop.abort(self._request.rid)


def _is_batch(value, is_messages: bool) -> bool:
    if is_messages:  # a batch of chats is a list of lists of messages
        return bool(value) and isinstance(value[0], (list, tuple))
    return isinstance(value, (list, tuple)) and bool(value) and not isinstance(value[0], int)


def _per_item(value, n: int, single_type) -> list:
    if value is None:
        return [None] * n
    if single_type is not None and isinstance(value, single_type):
        return [value] * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"expected {n} per-prompt values, got {value!r:.80}")
    return list(value)


def _user_error(err: BaseException) -> BaseException:
    if isinstance(err, (ValueError, RequestFailedError, EngineDeadError, EngineBusyError)):
        return err
    return RuntimeError(f"generation failed: {err}")
