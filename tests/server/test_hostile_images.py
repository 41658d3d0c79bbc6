"""Hostile images next to live streams (App over the real engine): a 1 x
1,000,000 strip (17 KB as a PNG) or a 1 x 20,000 one beside a photo would be
padded to a giant square in a multi-image prompt. Such a request is refused
with a 400 naming the image and the limit before it reaches the engine, a
large-but-allowed one is answered; either way 8 streams running beside it
finish with exactly their tokens and never wait 2 s between chunks."""

import asyncio
import base64
import io
import time
from pathlib import Path

import orjson
import pytest
from PIL import Image

from tests.server.conftest import acall, make_app, request

PHOTO = Path("/work/shared/data/images/cat.jpeg")
STREAM_TOKENS = 48
MAX_GAP_S = 2.0


def png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def strip(width: int) -> Image.Image:
    return Image.new("RGB", (width, 1), (200, 30, 90))


def text_chat(index: int) -> dict:
    return {"messages": [{"role": "user", "content": f"story number {index} about a cat"}],
            "max_tokens": STREAM_TOKENS, "temperature": 0, "ignore_eos": True}


def strip_chat(strip_uri: str) -> dict:
    photo = "data:image/jpeg;base64," + base64.b64encode(PHOTO.read_bytes()).decode()
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": strip_uri}},
        {"type": "image_url", "image_url": {"url": photo}},
        {"type": "text", "text": "compare them"}]}], "max_tokens": 4, "temperature": 0}


async def timed_stream(app, body: dict):
    """(content text, [seconds between consecutive chunks], ended with [DONE])."""
    response = await app(request("POST", "/v1/chat/completions", dict(body, stream=True)))
    assert response.status == 200
    text, gaps, last, done = "", [], time.perf_counter(), False
    async for chunk in response.body:
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        for line in chunk.decode().splitlines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                delta = orjson.loads(line[6:])["choices"]
                text += "".join(c["delta"].get("content") or "" for c in delta)
    return text, gaps[1:], done  # the first gap includes the queueing before the first token


async def streams_beside(app, hostile_body: dict):
    streams = [asyncio.ensure_future(timed_stream(app, text_chat(i))) for i in range(8)]
    await asyncio.sleep(0.3)  # the streams are running when the hostile request arrives
    hostile = await acall(app, "POST", "/v1/chat/completions", hostile_body)
    return hostile, await asyncio.gather(*streams)


@pytest.fixture(scope="module")
def expected_texts(engine, base_args):
    """Each stream's answer when it runs alone."""
    app = make_app(engine, base_args)
    return [asyncio.run(acall(app, "POST", "/v1/chat/completions", text_chat(i)))[2]
            ["choices"][0]["message"]["content"] for i in range(8)]


@pytest.mark.parametrize("width", [1_000_000, 20_000])
def test_a_giant_canvas_is_a_400_naming_image_and_limit(app, expected_texts, width):
    (status, _, body), streams = asyncio.run(streams_beside(app, strip_chat(png_uri(strip(width)))))
    assert status == 400, body
    message = body["error"]["message"]
    assert "image 1" in message and f"{width}x1" in message
    assert f"{width}x{width} square canvas" in message and "64,000,000" in message
    assert "--max-image-pixels" in message
    assert_streams_exact(streams, expected_texts)


def test_a_large_allowed_canvas_is_answered_without_stalling_streams(app, expected_texts):
    (status, _, body), streams = asyncio.run(streams_beside(app, strip_chat(png_uri(strip(6000)))))
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 4
    assert_streams_exact(streams, expected_texts)


def assert_streams_exact(streams, expected_texts):
    for (text, gaps, done), expected in zip(streams, expected_texts):
        assert done and text == expected
        assert max(gaps) < MAX_GAP_S, max(gaps)
