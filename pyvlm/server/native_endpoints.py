"""SGLang's native endpoints: POST /generate, POST /flush_cache, the model
and server info, health checks and /metrics."""

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, List, Mapping

from pyvlm import __version__
from pyvlm.scheduling.sampling_ranges import SamplingFieldError
from pyvlm.entrypoints.sampling import sampling_params_from
from pyvlm.http.sse import sse_json
from pyvlm.http.types import Response
from pyvlm.server import fields
from pyvlm.server.errors import ApiError, invalid, unavailable
from pyvlm.server.generation import EngineInput
from pyvlm.server.openai_endpoints import event_stream, json_response, open_stream
from pyvlm.server.params import AnswerSpec
from pyvlm.server.dispatch import Run

GENERATE_FIELDS = ("text", "input_ids", "image_data", "sampling_params", "stream", "rid",
                   "return_logprob", "top_logprobs_num", "mm_processor_kwargs")


@dataclass(frozen=True)
class ImageRef:
    """An image to fetch (the media loader's ref: source and param path)."""

    source: str
    param: str


async def generate(app, body: Mapping):
    """{"text"|"input_ids", "image_data", "sampling_params", "stream"} ->
    {"text", "output_ids", "meta_info"} (streamed: cumulative, SGLang style)."""
    fields.check_known(body, GENERATE_FIELDS)
    prompt = _native_prompt(body, app.vocab_size)
    sampling = _native_sampling(body, app.vocab_size)
    refs = _image_refs(body.get("image_data"), app.args.limit_mm_per_prompt)
    top = fields.get_sampling(body, "top_logprobs_num", "top_logprobs") or 0
    spec = AnswerSpec(1, fields.get_bool(body, "stream", False), False,
                      top if fields.get_bool(body, "return_logprob", False) else None, None)
    images, ticket = await app.admit_and_fetch(refs, 1)
    run = Run([EngineInput(prompt, images, False, fields.get_object(body, "mm_processor_kwargs"))],
              sampling, spec, "gen", ticket)
    if spec.stream:
        deltas = await open_stream(app.dispatcher.stream(run))
        return event_stream(_cumulative(deltas), deltas)
    result = (await app.dispatcher.collect(run))[0]
    return json_response({"text": result.text, "output_ids": result.token_ids,
                          "meta_info": _with_logprobs(result.meta, result.logprobs)})


def _native_sampling(body: Mapping, vocab_size: int) -> dict:
    """The sampling_params of a /generate body, checked by the engine's own
    rules (types and ranges: a 400 naming sampling_params.<field>)."""
    sampling = dict(fields.get_object(body, "sampling_params"))
    try:
        params = sampling_params_from(sampling)
    except SamplingFieldError as exc:
        raise invalid(f"sampling_params: {exc}", f"sampling_params.{exc.param}") from None
    if any(token_id >= vocab_size for token_id, _ in params.logit_bias):
        raise invalid(f"'logit_bias' has a token id outside the vocabulary (size {vocab_size})",
                      "sampling_params.logit_bias")
    return sampling


def _native_prompt(body: Mapping, vocab_size: int):
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise invalid("give exactly one of 'text' and 'input_ids'", "text")
    if text is not None:
        return fields.get_str(body, "text")
    if not fields.is_token_ids(ids) or max(ids) >= vocab_size:
        raise invalid(f"'input_ids' must be a non-empty list of token ids below {vocab_size}",
                      "input_ids")
    return ids


def _image_refs(image_data: Any, max_images: int) -> List[ImageRef]:
    if image_data is None:
        return []
    sources = [image_data] if isinstance(image_data, str) else image_data
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise invalid("'image_data' must be a URL/data URI or a list of them", "image_data")
    if len(sources) > max_images:
        raise invalid(f"The request has {len(sources)} images; at most {max_images} are "
                      f"allowed per request (--limit-mm-per-prompt)", "image_data")
    return [ImageRef(s, f"image_data[{i}]") for i, s in enumerate(sources)]


def _with_logprobs(meta: dict, logprobs: list) -> dict:
    """meta_info listing the logprobs of every token so far (SGLang's
    /generate shape); the engine's delta metas list only the new ones."""
    if "output_token_logprobs" not in meta:
        return meta
    return dict(meta, output_token_logprobs=[(lp, tid) for tid, lp, _ in logprobs],
                output_top_logprobs=[top for _, _, top in logprobs])


async def _cumulative(deltas) -> AsyncIterator[bytes]:
    """SGLang's /generate stream: each event holds the text, ids and
    logprobs so far (a batch of deltas' events in one body chunk)."""
    text, ids, logprobs = "", [], []
    async for batch in deltas:
        events = []
        for delta in batch:
            text, ids = text + delta.text, ids + delta.token_ids
            logprobs.extend(delta.logprobs)
            events.append(sse_json({"text": text, "output_ids": ids,
                                    "meta_info": _with_logprobs(delta.meta, logprobs)}))
        yield b"".join(events)


# ---- info, health, cache --------------------------------------------------

async def models(app, _body) -> Response:
    return json_response({"object": "list", "data": [{
        "id": app.args.model_name, "object": "model", "created": app.created,
        "owned_by": "pyvlm", "root": app.info["model_path"],
        "max_model_len": app.context_length}]})


async def model_info(app, _body) -> Response:
    info = app.info
    return json_response({"model_path": info["model_path"],
                          "tokenizer_path": info["tokenizer_path"],
                          "served_model_name": app.args.model_name, "is_generation": True,
                          "architectures": info["architectures"],
                          "context_length": app.context_length,
                          "chat_template": app.template_name, "is_demo": info["is_demo"]})


async def server_info(app, _body) -> Response:
    stats = await app.engine_stats()
    return json_response(dict(app.args.public_dict(), version=__version__,
                              model_name=app.args.model_name, engine_stats=stats))


async def health(app, _body) -> Response:
    """200 while serving; 503 while shutting down or once the engine has
    stopped (a device failure: the supervisor should restart the process)."""
    if not app.is_serving:
        raise unavailable()
    failure = app.engine.health()
    if failure is not None:
        raise unavailable(f"The engine is not running: {failure}")
    return Response(200, b"", content_type="text/plain; charset=utf-8")


async def health_generate(app, _body) -> Response:
    """Runs a one-token generation (the engine is really alive)."""
    if not app.is_serving:
        raise unavailable()
    spec = AnswerSpec(1, False, False, None, None)
    run = Run([EngineInput("hi", (), True)], {"max_new_tokens": 1, "temperature": 0.0,
                                              "ignore_eos": True}, spec, "health")
    try:
        await asyncio.wait_for(app.dispatcher.collect(run), app.args.watchdog_timeout)
    except (asyncio.TimeoutError, ApiError):
        raise unavailable("The engine did not generate a token") from None
    return Response(200, b"", content_type="text/plain; charset=utf-8")


async def flush_cache(app, _body) -> Response:
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, app.engine.flush_cache):
        raise ApiError(400, "Cannot flush the cache while requests are running", None,
                       "cache_busy")
    return json_response({"success": True, "message": "Cache flushed."})


async def metrics(app, _body) -> Response:
    stats = await app.engine_stats()
    return Response(200, app.metrics.render(stats).encode(),
                    content_type="text/plain; version=0.0.4; charset=utf-8")
