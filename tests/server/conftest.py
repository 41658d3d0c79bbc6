"""A real pyvlm.Engine on the tiny Qwen2 checkpoint behind App, driven with
Request objects (no sockets), with the real chat templates and media loader."""

import asyncio
from dataclasses import replace

import orjson
import pytest

import pyvlm
from pyvlm.http.types import Request
from pyvlm.server.app import App
from pyvlm.server.args import ServerArgs
ENGINE_ARGS = dict(device="cpu", page_size=4, max_total_tokens=4096, context_length=512,
                   chunked_prefill_size=64, max_running_requests=8)


@pytest.fixture(scope="session")
def engine(tiny_checkpoint_qwen2):
    with pyvlm.Engine(model=str(tiny_checkpoint_qwen2), **ENGINE_ARGS) as eng:
        yield eng


@pytest.fixture(scope="session")
def base_args(tiny_checkpoint_qwen2):
    return ServerArgs(model=str(tiny_checkpoint_qwen2), served_model_name="tiny",
                      max_running_requests=8)


def make_app(engine, args) -> App:
    return App(engine, args)


@pytest.fixture
def app_with(engine, base_args):
    """app_with(**overrides) -> an App whose args replace those fields."""
    return lambda **overrides: make_app(engine, replace(base_args, **overrides))


@pytest.fixture
def app(app_with):
    return app_with()


def request(method: str, path: str, body=None, headers=()) -> Request:
    raw = body if isinstance(body, bytes) else (b"" if body is None else orjson.dumps(body))
    return Request(method, path, path, "", list(headers), raw)


def call(app, method, path, body=None, headers=()):
    """Runs one request; returns (status, headers, parsed body or SSE events)."""
    return asyncio.run(acall(app, method, path, body, headers))


async def acall(app, method, path, body=None, headers=()):
    response = await app(request(method, path, body, headers))
    if hasattr(response.body, "__aiter__"):
        chunks = [chunk async for chunk in response.body]
        return response.status, response.headers, parse_sse(b"".join(chunks))
    data = response.body
    parsed = orjson.loads(data) if data and response.content_type == "application/json" else data
    return response.status, response.headers, parsed


def parse_sse(raw: bytes) -> list:
    """[(event name or None, parsed data or '[DONE]')] of an SSE body."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name, data = None, None
        for line in block.split("\n"):
            key, _, value = line.partition(": ")
            name, data = (value, data) if key == "event" else (name, value)
        events.append((name, data if data == "[DONE]" else orjson.loads(data)))
    return events
