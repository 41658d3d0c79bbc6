"""Admission comes before any image work: a request over the in-flight
limit is a 429 with Retry-After before its image is fetched or decoded, and
a full engine image budget is a 429 too (never a 500); the slots of a
request whose image fails are given back."""

import asyncio
import base64
import io

import pytest
from PIL import Image

from tests.multimodal.media_server import MediaServer
from tests.server.conftest import acall, request

LONG = {"messages": [{"role": "user", "content": "tell a long story"}], "max_tokens": 200,
        "temperature": 0, "ignore_eos": True, "stream": True}


def image_chat(url):
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]}],
        "max_tokens": 2}


@pytest.fixture(scope="module")
def media():
    with MediaServer() as server:
        yield server


def test_over_the_limit_is_refused_before_the_image_is_fetched(app_with, media):
    app = app_with(max_running_requests=1, max_queued_requests=0, allow_private_media_urls=True)
    url = f"http://127.0.0.1:{media.port}/images/cat.jpeg"

    async def scenario():
        running = await app(request("POST", "/v1/chat/completions", LONG))
        chunks = running.body.__aiter__()
        await chunks.__anext__()  # the long request holds the only slot
        seen_before = len(media.seen)
        status, headers, body = await acall(app, "POST", "/v1/chat/completions", image_chat(url))
        await running.body.aclose()
        return status, dict(headers), body, len(media.seen) - seen_before

    status, headers, body, num_fetches = asyncio.run(scenario())
    assert status == 429 and headers["retry-after"] == "1", body
    assert body["error"]["type"] == "rate_limit_error"
    assert num_fetches == 0
    assert app.dispatcher.admission.num_in_flight == 0


def test_a_failed_image_gives_its_slots_back(app_with, media):
    app = app_with(max_running_requests=1, max_queued_requests=0, allow_private_media_urls=True)
    status, _, _ = asyncio.run(acall(app, "POST", "/v1/chat/completions",
                                     image_chat(f"http://127.0.0.1:{media.port}/garbage")))
    assert status == 422 and app.dispatcher.admission.num_in_flight == 0
    status, _, _ = asyncio.run(acall(app, "POST", "/v1/chat/completions", image_chat(
        f"http://127.0.0.1:{media.port}/images/dog.jpeg")))
    assert status == 200


def test_a_full_image_budget_is_a_429(app, engine, media, monkeypatch):
    monkeypatch.setattr(engine.builder.image_budget, "max_bytes", 1)
    monkeypatch.setattr(engine.builder.image_budget, "num_held_bytes", 1)  # as if one were held
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    status, headers, body = asyncio.run(acall(app, "POST", "/v1/chat/completions",
                                              image_chat(uri)))
    assert status == 429 and dict(headers)["retry-after"] == "1"
    assert "--max-pending-image-bytes" in body["error"]["message"]

