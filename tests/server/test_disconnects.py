"""A client that goes away at any stage leaves nothing behind: before its
body arrives, while the server fetches its image, while it waits in the
queue, in the middle of its prefill, and mid-stream. Afterwards the engine
holds no request and no page beyond the prefix cache's own, no fetch task
is left on the event loop, admission is back to zero and /metrics' gauges
read idle. Real sockets on loopback, the server in this process."""

import asyncio
import threading

import orjson
import pytest

import pyvlm
from pyvlm.http.server import HttpLimits, HttpServer
from pyvlm.server.app import App
from pyvlm.server.args import ServerArgs
from tests.multimodal.media_server import MediaServer


@pytest.fixture(scope="module")
def engine(tiny_checkpoint_qwen2):
    # One running request at a time and short prefill chunks, so a request
    # can be caught in the queue or between its prefill chunks.
    with pyvlm.Engine(model=str(tiny_checkpoint_qwen2), device="cpu", page_size=4,
                      max_total_tokens=4096, context_length=512, chunked_prefill_size=16,
                      max_running_requests=1) as eng:
        yield eng


@pytest.fixture(scope="module")
def media():
    with MediaServer() as server:
        yield server


def chat(content, max_tokens=4, stream=False, **extra) -> bytes:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream, **extra}
    return orjson.dumps(body)


def post_head(body_length: int) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % body_length)


class Harness:
    """The App behind an HttpServer on this test's event loop."""

    def __init__(self, engine):
        self.engine = engine
        self.app = App(engine, ServerArgs(served_model_name="tiny", enable_metrics=True,
                                          allow_private_media_urls=True,
                                          max_running_requests=1))
        self.server = HttpServer(self.app, HttpLimits())

    async def __aenter__(self):
        await self.server.start("127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc):
        await self.server.shutdown(grace_s=1.0)

    async def connect(self):
        return await asyncio.open_connection("127.0.0.1", self.server.port)

    async def send(self, payload: bytes):
        reader, writer = await self.connect()
        writer.write(payload)
        await writer.drain()
        return reader, writer

    async def get(self, path: str) -> bytes:
        reader, writer = await self.send(b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close"
                                         b"\r\n\r\n" % path.encode())
        data = await reader.read()
        writer.close()
        return data.partition(b"\r\n\r\n")[2]

    async def stats(self) -> dict:
        return await asyncio.get_running_loop().run_in_executor(None, self.engine.get_stats)

    async def wait_for(self, predicate, timeout=20.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(await self.stats()):
            assert asyncio.get_running_loop().time() < deadline, await self.stats()
            await asyncio.sleep(0.02)

    async def assert_idle(self):
        await self.wait_for(lambda s: s["num_running_reqs"] == s["num_queued_reqs"] == 0
                            and s["num_used_pages"] == 0)
        for _ in range(100):  # cancelled handlers finish on later loop turns
            if self.app.dispatcher.admission.num_in_flight == 0 and not self.server.connections:
                break
            await asyncio.sleep(0.02)
        assert self.app.dispatcher.admission.num_in_flight == 0
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not others, others  # no handler, fetch or pump task is left behind
        metrics = (await self.get("/metrics")).decode()
        for gauge in ("num_running_reqs", "num_queued_reqs"):
            [line] = [l for l in metrics.splitlines() if gauge in l and not l.startswith("#")]
            assert line.endswith(" 0") or line.endswith(" 0.0"), line


def run(engine, scenario):
    async def main():
        async with Harness(engine) as harness:
            await scenario(harness)
            await harness.assert_idle()
    asyncio.run(main())


def test_gone_before_the_body(engine):
    async def scenario(h):
        body = chat("the cat sat")
        _, writer = await h.send(post_head(len(body)) + body[:10])
        await asyncio.sleep(0.2)
        writer.close()
        await asyncio.sleep(0.2)
        assert (await h.stats())["num_running_reqs"] == 0
    run(engine, scenario)


def test_gone_while_the_image_is_fetched(engine, media):
    async def scenario(h):
        url = f"http://127.0.0.1:{media.port}/slow"  # drips its bytes, never completes
        body = chat([{"type": "image_url", "image_url": {"url": url}},
                     {"type": "text", "text": "what?"}])
        _, writer = await h.send(post_head(len(body)) + body)
        while not any(path == "/slow" for path, _ in media.seen):
            await asyncio.sleep(0.02)
        writer.close()
    run(engine, scenario)


async def stream_until_first_token(h, body):
    reader, writer = await h.send(post_head(len(body)) + body)
    while b'"content":"' not in await reader.readline():
        pass
    return reader, writer


def test_gone_while_queued_and_then_mid_stream(engine):
    async def scenario(h):
        _, first = await stream_until_first_token(
            h, chat("a long story", max_tokens=300, stream=True))
        queued_body = chat("the cat sat", max_tokens=4)
        _, second = await h.send(post_head(len(queued_body)) + queued_body)
        await h.wait_for(lambda s: s["num_queued_reqs"] == 1)
        second.close()  # gone while queued behind the running one
        await h.wait_for(lambda s: s["num_queued_reqs"] == 0 and s["num_running_reqs"] == 1)
        first.close()  # gone mid-stream
    run(engine, scenario)


def test_gone_in_the_middle_of_the_prefill(engine):
    in_prefill, resume = threading.Event(), threading.Event()

    def slow_prefill(stage, chunks):
        if stage == "prefill":
            in_prefill.set()
            resume.wait(5)

    async def scenario(h):
        engine.state.runner.fault_hook = slow_prefill
        try:
            body = chat("the cat sat on a mat " * 20, max_tokens=4)  # many 16-token chunks
            _, writer = await h.send(post_head(len(body)) + body)
            await asyncio.get_running_loop().run_in_executor(None, in_prefill.wait, 10)
            writer.close()
            await asyncio.sleep(0.2)
            resume.set()
        finally:
            engine.state.runner.fault_hook = None
    run(engine, scenario)
