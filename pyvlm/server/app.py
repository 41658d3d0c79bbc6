"""The OpenAI-compatible application: `App(engine, args)` is the Handler of
pyvlm/http/types.py (routing, auth, JSON bodies, errors) over a pyvlm.Engine.

The engine is passed in, so this package never imports torch. Chat
messages are rendered with the engine's chat template (pyvlm.chat, resolved
once when the engine started, so pyvlm.Engine's messages render the same);
the image loader (pyvlm.multimodal.media) is built from the args unless
given."""

import asyncio
import hmac
import logging
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import orjson

from pyvlm.http.types import Request, Response, StreamingResponse
from pyvlm.server import native_endpoints as native
from pyvlm.server import openai_endpoints as oai
from pyvlm.server.args import ServerArgs
from pyvlm.server.errors import ApiError, internal_error, invalid, unavailable
from pyvlm.server.metrics import ServerMetrics
from pyvlm.server.dispatch import Admission, Dispatcher

logger = logging.getLogger("pyvlm.server")

Endpoint = Callable[[Any, Mapping], Any]
# path -> (method -> (endpoint, needs a JSON body))
ROUTES: Dict[str, Dict[str, Tuple[Endpoint, bool]]] = {
    "/health": {"GET": (native.health, False)},
    "/health_generate": {"GET": (native.health_generate, False)},
    "/v1/models": {"GET": (native.models, False)},
    "/get_model_info": {"GET": (native.model_info, False)},
    "/get_server_info": {"GET": (native.server_info, False)},
    "/v1/chat/completions": {"POST": (oai.chat_completions, True)},
    "/v1/completions": {"POST": (oai.completions, True)},
    "/generate": {"POST": (native.generate, True)},
    "/flush_cache": {"POST": (native.flush_cache, False)},
    "/metrics": {"GET": (native.metrics, False)},
}
OPEN_PATHS = ("/health",)  # answered without an API key (load balancers probe it)


class App:
    """The request handler (see the module docstring)."""

    def __init__(self, engine, args: ServerArgs, load_images=None):
        self.engine, self.args = engine, args
        self.info = engine.model_info()
        self.context_length = self.info["context_length"]
        self.vocab_size = self.info["vocab_size"]
        self.template = engine.chat_template
        self.load_images = load_images if load_images is not None else default_loader(args)
        self.metrics = ServerMetrics(args.model_name)
        # Each data-parallel replica runs up to max_running_requests.
        self.dispatcher = Dispatcher(engine, Admission(args.max_running_requests * args.dp_size,
                                                       args.max_queued_requests), self.metrics)
        self.created = int(time.time())
        self.is_serving = True  # False once shutdown began: /health is 503, work refused

    @property
    def template_name(self) -> Optional[str]:
        return getattr(self.template, "name", None)

    def begin_shutdown(self) -> None:
        self.is_serving = False

    async def __call__(self, request: Request):
        start = time.perf_counter()
        response = await self._answer(request)
        self.metrics.on_request(self._endpoint_label(request.path), response.status)
        if self.args.log_requests:
            logger.info("%s %s -> %d (%.1f ms)", request.method, request.path, response.status,
                        1000 * (time.perf_counter() - start))
        return response

    async def _answer(self, request: Request):
        try:
            return await self._dispatch(request)
        except ApiError as exc:
            return exc.to_response()
        except Exception:  # a bug: logged here, never shown to the client
            logger.exception("%s %s failed", request.method, request.path)
            return internal_error().to_response()

    async def _dispatch(self, request: Request):
        self._check_auth(request)
        methods = ROUTES.get(request.path)
        if methods is None or (request.path == "/metrics" and not self.args.enable_metrics):
            raise ApiError(404, f"No endpoint at {request.path[:200]}", None, "not_found")
        if request.method not in methods:
            allowed = ", ".join(sorted(methods))
            raise ApiError(405, f"Method {request.method[:20]} is not allowed on {request.path}; "
                                f"use {allowed}", None, "method_not_allowed",
                           [("allow", allowed)])
        endpoint, needs_body = methods[request.method]
        if needs_body and not self.is_serving:
            raise unavailable()
        return await endpoint(self, parse_json(request.body) if needs_body else {})

    def _check_auth(self, request: Request) -> None:
        if self.args.api_key is None or request.path in OPEN_PATHS:
            return
        given = (request.header("authorization") or "").encode("utf-8", "surrogateescape")
        expected = f"Bearer {self.args.api_key}".encode()
        if not hmac.compare_digest(given, expected):  # constant time: no timing oracle
            raise ApiError(401, "Invalid or missing API key (send 'Authorization: Bearer KEY')",
                           None, "invalid_api_key", [("www-authenticate", "Bearer")])

    @staticmethod
    def _endpoint_label(path: str) -> str:
        return path if path in ROUTES else "other"

    # ---- helpers for the endpoints ---------------------------------------
    def render_chat(self, messages):
        """The template's RenderedChat; a template error is a 400."""
        try:
            return self.template.render(messages, add_generation_prompt=True)
        except ValueError as exc:
            raise invalid(str(exc)[:1000], "messages") from None

    async def admit_and_fetch(self, refs: Sequence[Any], num_choices: int):
        """(decoded images, admission ticket): the request's slots are taken
        first, so under overload it is refused before any image is fetched
        or decoded; the ticket is given back if fetching fails."""
        ticket = self.dispatcher.admission.acquire(num_choices)
        try:
            return await self.fetch_images(refs), ticket
        except BaseException:
            ticket.release()
            raise

    async def fetch_images(self, refs: Sequence[Any]) -> list:
        """Decoded images; media that cannot be fetched or decoded is a 422
        naming the part."""
        if not refs:
            return []
        try:
            return list(await self.load_images(refs))
        except ValueError as exc:
            raise ApiError(422, str(exc)[:1000] or "cannot load the image",
                           getattr(exc, "param", None), "invalid_image") from None

    def token_texts(self, token_ids):
        return self.engine.token_texts(token_ids)

    async def engine_stats(self) -> dict:
        # get_stats waits for the engine thread between steps: off the event loop.
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self.engine.get_stats)
        except RuntimeError:
            raise unavailable("The engine is not running") from None


def parse_json(body: bytes) -> Mapping:
    """The body as a JSON object, whatever the Content-Type said."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"The request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise invalid("The request body must be a JSON object")
    return value


def default_loader(args: ServerArgs):
    from pyvlm.multimodal.media import MediaPolicy, load_images

    policy = MediaPolicy(allowed_local_media_path=args.allowed_local_media_path,
                         allow_private_urls=args.allow_private_media_urls,
                         max_pixels=args.max_image_pixels)

    async def load(refs):
        return await load_images(refs, policy)

    return load
