"""The server on 127.0.0.1 (ephemeral port, uvloop in a thread), driven by
raw sockets and `requests`."""

import asyncio
import hashlib
import socket
import threading
import time

import orjson
import pytest
import requests

from pyvlm.http.limits import HttpLimits
from pyvlm.http.server import HttpServer, new_event_loop, serve
from pyvlm.http.sse import SSE_DONE, sse_event
from pyvlm.http.types import Response, StreamingResponse
from tests.http.mock_transport import read_responses

MAX_BODY = 100_000


class App:
    """A fake application with hooks the tests can observe."""

    def __init__(self):
        self.next_event = None  # asyncio.Event, set from the test thread
        self.hang_cancelled = threading.Event()
        self.hang_started = threading.Event()

    async def __call__(self, request):
        route = getattr(self, "route_" + request.path.strip("/").replace("/", "_"), None)
        if route is None:
            return Response(404, b'{"error": {"message": "not found"}}')
        return await route(request)

    async def route_health(self, request):
        return Response(200, orjson.dumps({"client_port": request.client[1]}))

    async def route_echo(self, request):
        return Response(200, orjson.dumps({"num_bytes": len(request.body), "sha256": hashlib.sha256(request.body).hexdigest()}))

    async def route_slow(self, request):
        await asyncio.sleep(0.3)
        return Response(200, b'{"slow": true}')

    async def route_hang(self, request):
        self.hang_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.hang_cancelled.set()
            raise

    async def route_stream(self, request):
        self.next_event = asyncio.Event()

        async def events():
            yield sse_event(b'{"n": 1}')
            await self.next_event.wait()  # released by the test after it read event 1
            yield sse_event(b'{"n": 2}')
            yield SSE_DONE

        return StreamingResponse(200, events(), headers=[("cache-control", "no-cache")])


class LiveServer:
    def __init__(self, limits: HttpLimits):
        self.app = App()
        self.server = HttpServer(self.app, limits)
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.server.start("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.port}"

    def run(self, coroutine, timeout_s: float = 10):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def call_soon(self, callback):
        self.loop.call_soon_threadsafe(callback)

    def close(self):
        self.run(self.server.shutdown(grace_s=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def live():
    server = LiveServer(HttpLimits(max_body_bytes=MAX_BODY, linger_s=0.5))
    yield server
    server.close()


def raw_connection(live) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", live.server.port), timeout=5)
    return sock


def receive_until(sock, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def test_keep_alive_reuses_one_connection(live):
    with requests.Session() as session:
        ports = {session.get(live.url + "/health").json()["client_port"] for _ in range(3)}
    assert len(ports) == 1


def test_chunked_upload_with_requests(live):
    pieces = [bytes([i]) * (i * 97 % 5000) for i in range(40)]
    response = requests.post(live.url + "/echo", data=iter(pieces))
    body = b"".join(pieces)
    assert response.json() == {"num_bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_expect_100_continue_over_a_socket(live):
    with raw_connection(live) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert receive_until(sock, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        (response,) = read_responses(receive_until(sock, b"}"))
    assert orjson.loads(response.body)["num_bytes"] == 5


def test_413_arrives_before_the_body_is_sent(live):
    with raw_connection(live) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        (response,) = read_responses(receive_until(sock, b"}}"))
    assert response.status == 413 and orjson.loads(response.body)["error"]["type"] == "invalid_request_error"


def test_413_reaches_requests_even_while_it_uploads(live):
    response = requests.post(live.url + "/echo", data=b"x" * (4 * MAX_BODY))
    assert response.status_code == 413 and "error" in response.json()


def test_431_for_huge_headers(live):
    response = requests.get(live.url + "/health", headers={"x-big": "b" * 70_000})
    assert response.status_code == 431 and response.json()["error"]["param"] is None
    assert requests.get(live.url + "/health").status_code == 200


def test_pipelined_requests_over_a_socket(live):
    with raw_connection(live) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\nPOST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhiGET /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while piece := sock.recv(65536):
            data += piece
    responses = read_responses(data)
    assert [r.status for r in responses] == [200, 200, 404]
    assert orjson.loads(responses[1].body)["num_bytes"] == 2


def test_sse_is_delivered_incrementally(live):
    with requests.get(live.url + "/stream", stream=True) as response:
        assert response.headers["content-type"] == "text/event-stream"
        lines = response.iter_lines()
        assert next(lines) == b'data: {"n": 1}'  # arrives while the producer still waits
        live.call_soon(lambda: live.app.next_event.set())
        rest = [line for line in lines if line]
    assert rest == [b'data: {"n": 2}', b"data: [DONE]"]


def test_client_disconnect_cancels_the_handler(live):
    with raw_connection(live) as sock:
        sock.sendall(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        assert live.app.hang_started.wait(5)
    assert live.app.hang_cancelled.wait(2)
    assert requests.get(live.url + "/health").status_code == 200


def test_serve_shuts_down_gracefully():
    app, loop = App(), new_event_loop()
    ready, stop, port = asyncio.Event(), asyncio.Event(), _free_port()
    task_result = {}

    def run_server():
        async def main():
            await serve(app, "127.0.0.1", port, limits=HttpLimits(shutdown_grace_s=2), ready=ready, stop=stop)
            task_result["done"] = True

        loop.run_until_complete(main())

    thread = threading.Thread(target=run_server, daemon=True)
    thread.start()
    _wait_until(lambda: ready.is_set())
    slow = {}
    client = threading.Thread(target=lambda: slow.setdefault("response", requests.get(f"http://127.0.0.1:{port}/slow")))
    client.start()
    time.sleep(0.1)  # the slow request is in flight
    loop.call_soon_threadsafe(stop.set)
    client.join(5)
    thread.join(5)
    assert slow["response"].status_code == 200 and slow["response"].headers["connection"] == "close"
    assert task_result == {"done": True}
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(condition, timeout_s: float = 5):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
