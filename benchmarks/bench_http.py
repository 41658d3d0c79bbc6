"""The HTTP front alone, with a fake application: pyvlm's hand-written
server against uvicorn (a minimal ASGI app) and FastAPI on uvicorn, all in
the same run, each server in its own process on uvloop.

    python benchmarks/bench_http.py [--connections 32] [--seconds 3] [--events 20000]

Measures requests/s of GET /health over keep-alive connections (raw-socket
asyncio clients) and SSE events/s streamed to one client by an endpoint that
yields K small events. Prints a markdown table with ratios pyvlm / baseline.
"""

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

HEALTH_BODY = b'{"status":"ok"}'
EVENT = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
DONE = b"data: [DONE]\n\n"


# -- the servers (run in child processes) ------------------------------------
def serve_pyvlm(port: int) -> None:
    from pyvlm.http.server import HttpLimits, new_event_loop, serve
    from pyvlm.http.types import Response, StreamingResponse

    async def handler(request):
        if request.path == "/stream":
            return StreamingResponse(200, _events(int(request.query.partition("k=")[2])))
        return Response(200, HEALTH_BODY)

    new_event_loop().run_until_complete(serve(handler, "127.0.0.1", port, limits=HttpLimits()))


async def _events(num_events: int):
    for _ in range(num_events):
        yield EVENT
    yield DONE


async def asgi_app(scope, receive, send):
    """The same fake as a bare ASGI app."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/stream":
        num_events = int(scope["query_string"].decode().partition("k=")[2])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        async for event in _events(num_events):
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(HEALTH_BODY)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": HEALTH_BODY})


def fastapi_app():
    from fastapi import FastAPI
    from fastapi.responses import Response, StreamingResponse

    app = FastAPI()

    @app.get("/health")
    async def health():
        return Response(HEALTH_BODY, media_type="application/json")

    @app.get("/stream")
    async def stream(k: int):
        return StreamingResponse(_events(k), media_type="text/event-stream")

    return app


def serve_uvicorn(port: int, app) -> None:
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="error", access_log=False)


SERVERS = {
    "pyvlm": serve_pyvlm,
    "uvicorn (ASGI)": lambda port: serve_uvicorn(port, asgi_app),
    "uvicorn + FastAPI": lambda port: serve_uvicorn(port, fastapi_app()),
}


# -- the clients ---------------------------------------------------------------
async def _read_response(reader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    start = head.lower().find(b"content-length:") + len(b"content-length:")
    await reader.readexactly(int(head[start : head.find(b"\r\n", start)]))


async def _health_client(port: int, deadline: float, counts: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n"
    num_done = 0
    while time.perf_counter() < deadline:
        writer.write(request)
        await _read_response(reader)
        num_done += 1
    counts.append(num_done)
    writer.close()


async def health_requests_per_s(port: int, num_connections: int, seconds: float) -> float:
    counts = []
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(_health_client(port, deadline, counts) for _ in range(num_connections)))
    return sum(counts) / (time.perf_counter() - start)


async def sse_events_per_s(port: int, num_events: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    writer.write(b"GET /stream?k=%d HTTP/1.1\r\nHost: bench\r\n\r\n" % num_events)
    tail = b""
    while not tail.endswith(b"0\r\n\r\n") or DONE not in tail:
        piece = await reader.read(1 << 16)
        if not piece:
            raise RuntimeError("stream ended early")
        tail = (tail + piece)[-64:]
    elapsed = time.perf_counter() - start
    writer.close()
    return num_events / elapsed


# -- driver --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(name: str) -> "tuple[subprocess.Popen, int]":
    port = _free_port()
    code = f"import sys; sys.path.insert(0, {os.getcwd()!r}); from benchmarks.bench_http import SERVERS; SERVERS[{name!r}]({port})"
    process = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{name} did not start")


def measure(name: str, args) -> "tuple[float, float]":
    process, port = _start(name)
    try:
        loop = _client_loop()
        loop.run_until_complete(health_requests_per_s(port, args.connections, 0.5))  # warm-up
        rps = [loop.run_until_complete(health_requests_per_s(port, args.connections, args.seconds)) for _ in range(args.rounds)]
        eps = [loop.run_until_complete(sse_events_per_s(port, args.events)) for _ in range(args.rounds)]
        loop.close()
        return statistics.median(rps), statistics.median(eps)
    finally:
        process.terminate()
        process.wait(10)


def _client_loop():
    import uvloop

    return uvloop.new_event_loop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=32, help="concurrent keep-alive clients for /health")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each /health round")
    parser.add_argument("--events", type=int, default=20000, help="SSE events per stream")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server (median reported)")
    parser.add_argument("--servers", nargs="*", default=list(SERVERS), help="subset of: " + ", ".join(SERVERS))
    args = parser.parse_args()
    results = {name: measure(name, args) for name in args.servers}
    print_table(results, args)


def print_table(results, args) -> None:
    base_rps, base_eps = results.get("pyvlm", (float("nan"), float("nan")))
    print(f"\n/health: {args.connections} keep-alive connections, {args.seconds:g} s x {args.rounds} rounds (median); "
          f"SSE: one client, {args.events} events of {len(EVENT)} bytes x {args.rounds} rounds (median); CPU count {os.cpu_count()}\n")  # fmt: skip
    print("| server | /health req/s | pyvlm / this | SSE events/s | pyvlm / this |")
    print("|---|---:|---:|---:|---:|")
    for name, (rps, eps) in results.items():
        print(f"| {name} | {rps:,.0f} | {base_rps / rps:.2f}x | {eps:,.0f} | {base_eps / eps:.2f}x |")


if __name__ == "__main__":
    main()
