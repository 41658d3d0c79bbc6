"""The asyncio protocol driven through a mock transport (no sockets):
pipelining, 100-continue, flow control, timeouts, disconnects, errors."""

import asyncio
import functools
import json

import orjson

from pyvlm.http.response import CONTINUE
from pyvlm.http.types import Response, StreamingResponse
from tests.http.mock_transport import connect, read_responses, settle


def run_async(test):
    @functools.wraps(test)
    def wrapper():
        asyncio.run(asyncio.wait_for(test(), timeout=10))

    return wrapper


async def echo(request):
    """Answers with what it received, after a delay given in the path."""
    delay = float(request.query.partition("delay=")[2] or 0)
    await asyncio.sleep(delay)
    payload = {"method": request.method, "path": request.path, "body": request.body.decode("latin-1")}
    return Response(200, orjson.dumps(payload))


def get(path: str, *headers: str, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: t", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(path: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: t", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def error_of(response) -> dict:
    error = json.loads(response.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@run_async
async def test_pipelined_responses_come_back_in_request_order():
    protocol, transport = connect(echo)
    slow_first = get("/a?delay=0.05") + post("/b", b"body-b") + get("/c%20d?delay=0.01")
    protocol.data_received(slow_first)
    await asyncio.sleep(0.15)
    responses = read_responses(transport.written)
    assert [json.loads(r.body)["path"] for r in responses] == ["/a", "/b", "/c d"]
    assert json.loads(responses[1].body)["body"] == "body-b"
    assert all(r.status == 200 and r.getheader("connection") == "keep-alive" for r in responses)
    assert not transport.is_closed


@run_async
async def test_every_reader_split_byte_by_byte_still_gives_the_same_responses():
    protocol, transport = connect(echo)
    raw = post("/x", b"hello") + get("/y")
    for i in range(len(raw)):
        protocol.data_received(raw[i : i + 1])
    await asyncio.sleep(0.02)
    assert [json.loads(r.body)["body"] for r in read_responses(transport.written)] == ["hello", ""]


@run_async
async def test_chunked_request_body_reaches_the_handler():
    protocol, transport = connect(echo)
    protocol.data_received(b"POST /u HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n")
    await settle()
    assert json.loads(read_responses(transport.written)[0].body)["body"] == "abcdef"


@run_async
async def test_100_continue_is_sent_only_after_the_size_check():
    protocol, transport = connect(echo, max_body_bytes=10)
    protocol.data_received(post("/x", b"", "Expect: 100-continue").replace(b"Content-Length: 0", b"Content-Length: 4"))
    assert bytes(transport.written) == CONTINUE
    protocol.data_received(b"abcd")
    await settle()
    assert json.loads(read_responses(transport.written[len(CONTINUE) :])[0].body)["body"] == "abcd"

    protocol, transport = connect(echo, max_body_bytes=10)
    protocol.data_received(post("/x", b"", "Expect: 100-continue").replace(b"Content-Length: 0", b"Content-Length: 11"))
    await settle()
    (response,) = read_responses(transport.written)
    assert response.status == 413 and CONTINUE not in transport.written
    assert "10" in error_of(response)["message"] and transport.has_sent_eof


@run_async
async def test_100_continue_waits_for_the_earlier_response():
    protocol, transport = connect(echo)
    protocol.data_received(get("/a?delay=0.05") + b"PUT /b HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    await settle()
    assert transport.written == b""
    await asyncio.sleep(0.08)
    first_length = len(transport.written) - len(CONTINUE)
    assert transport.written.endswith(CONTINUE) and read_responses(transport.written[:first_length])[0].status == 200
    protocol.data_received(b"ok")
    await settle()
    assert json.loads(read_responses(transport.written[first_length + len(CONTINUE) :])[0].body)["body"] == "ok"


@run_async
async def test_refusals_answer_with_openai_errors_and_close():
    cases = {
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n": 400,
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n": 501,
        b"GET / HTTP/2.0\r\n\r\n": 505,
        b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 70000: 431,
    }
    for raw, status in cases.items():
        protocol, transport = connect(echo)
        protocol.data_received(raw)
        await settle()
        (response,) = read_responses(transport.written)
        assert response.status == status and response.getheader("connection") == "close"
        assert error_of(response)["type"] == "invalid_request_error"
        assert transport.has_sent_eof
        protocol.data_received(get("/ignored"))  # nothing more is parsed or answered
        await settle()
        assert len(read_responses(transport.written)) == 1


@run_async
async def test_a_refusal_waits_for_the_responses_before_it():
    protocol, transport = connect(echo)
    protocol.data_received(get("/a?delay=0.03") + b"GET / HTTP/9.9\r\n\r\n")
    await asyncio.sleep(0.06)
    assert [r.status for r in read_responses(transport.written)] == [200, 505]


@run_async
async def test_handler_exception_is_500_without_traceback():
    async def failing(request):
        raise KeyError("secret-detail")

    protocol, transport = connect(failing)
    protocol.data_received(get("/x") + get("/y"))
    await settle()
    responses = read_responses(transport.written)
    assert [r.status for r in responses] == [500, 500]  # the connection survives a handler bug
    assert error_of(responses[0]) == {"message": "internal server error", "type": "internal_server_error", "param": None, "code": None}
    assert b"secret" not in transport.written and b"Traceback" not in transport.written


@run_async
async def test_response_splitting_headers_become_500():
    async def splitting(request):
        return Response(200, b"{}", headers=[("x-a", "1\r\nset-cookie: evil")])

    protocol, transport = connect(splitting)
    protocol.data_received(get("/"))
    await settle()
    (response,) = read_responses(transport.written)
    assert response.status == 500 and b"evil" not in transport.written


@run_async
async def test_disconnect_cancels_the_handler_task():
    started, outcome = asyncio.Event(), []

    async def waits_forever(request):
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    protocol, transport = connect(waits_forever)
    protocol.data_received(get("/slow"))
    await started.wait()
    transport.close()  # the peer went away
    await settle()
    assert outcome == ["cancelled"]


@run_async
async def test_streaming_stops_producing_while_writing_is_paused():
    num_produced, finished = [0], []

    async def events():
        try:
            while True:
                num_produced[0] += 1
                await asyncio.sleep(0)  # a real producer awaits the engine between events
                yield b"data: %d\n\n" % num_produced[0]
        finally:
            finished.append(True)  # the app's cleanup runs when the stream is dropped

    async def stream(request):
        return StreamingResponse(200, events())

    protocol, transport = connect(stream)
    protocol.pause_writing()
    protocol.data_received(get("/stream"))
    await settle(50)
    assert num_produced[0] <= 2, "the producer ran ahead of a paused transport"
    protocol.resume_writing()
    await settle(5)
    protocol.pause_writing()
    produced = num_produced[0]
    await settle(50)
    assert produced > 2 and num_produced[0] <= produced + 1
    transport.close()
    await settle()
    assert finished == [True]
    assert transport.written.startswith(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked")


@run_async
async def test_stream_is_chunked_and_the_connection_kept_alive():
    async def stream(request):
        async def body():
            for i in range(3):
                yield b"data: %d\n\n" % i

        return StreamingResponse(200, body(), headers=[("cache-control", "no-cache")])

    protocol, transport = connect(stream)
    protocol.data_received(get("/s") + get("/s"))
    await settle()
    responses = read_responses(transport.written)
    assert [r.body for r in responses] == [b"data: 0\n\ndata: 1\n\ndata: 2\n\n"] * 2
    assert responses[0].getheader("cache-control") == "no-cache" and not transport.is_closed


@run_async
async def test_http10_stream_is_close_delimited():
    async def stream(request):
        async def body():
            yield b"data: x\n\n"

        return StreamingResponse(200, body())

    protocol, transport = connect(stream)
    protocol.data_received(get("/s", version="1.0"))
    await settle()
    head, _, body = bytes(transport.written).partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head and b"connection: close" in head
    assert body == b"data: x\n\n" and transport.has_sent_eof


@run_async
async def test_connection_close_and_http10_close_after_the_response():
    for raw in (get("/", "Connection: close"), get("/", version="1.0")):
        protocol, transport = connect(echo)
        protocol.data_received(raw + get("/never"))
        await settle()
        (response,) = read_responses(transport.written)
        assert response.status == 200 and response.getheader("connection") == "close"
        assert transport.has_sent_eof
    protocol, transport = connect(echo)
    protocol.data_received(get("/", "Connection: keep-alive", version="1.0") + get("/", version="1.0"))
    await settle()
    assert [r.getheader("connection") for r in read_responses(transport.written)] == ["keep-alive", "close"]


@run_async
async def test_head_request_has_no_body():
    protocol, transport = connect(echo)
    protocol.data_received(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
    await settle()
    head, _, body = bytes(transport.written).partition(b"\r\n\r\n")
    assert b"content-length: " in head and body == b""


@run_async
async def test_header_deadline_is_not_extended_by_trickled_bytes():
    protocol, transport = connect(echo, header_timeout_s=0.1)
    for byte in b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: abcdefgh":
        protocol.data_received(bytes([byte]))
        await asyncio.sleep(0.005)
        if transport.written:
            break
    await asyncio.sleep(0.12)
    (response,) = read_responses(transport.written)
    assert response.status == 408 and "headers" in error_of(response)["message"]


@run_async
async def test_body_silence_timeout():
    protocol, transport = connect(echo, body_timeout_s=0.05)
    protocol.data_received(post("/x", b"ab")[:-1])
    await asyncio.sleep(0.1)
    (response,) = read_responses(transport.written)
    assert response.status == 408 and "body" in error_of(response)["message"]


@run_async
async def test_idle_keep_alive_timeout_closes_but_not_during_a_slow_handler():
    protocol, transport = connect(echo, keep_alive_timeout_s=0.05)
    protocol.data_received(get("/?delay=0.1"))
    await asyncio.sleep(0.09)
    assert not transport.is_closed  # a running handler is not idleness
    await asyncio.sleep(0.03)
    assert read_responses(transport.written)[0].status == 200 and not transport.has_sent_eof
    await asyncio.sleep(0.06)
    assert transport.has_sent_eof


@run_async
async def test_reading_pauses_while_too_many_requests_wait():
    release = asyncio.Event()

    async def gated(request):
        await release.wait()
        return Response(200, request.path.encode())

    protocol, transport = connect(gated, max_pipelined_requests=2)
    protocol.data_received(b"".join(get(f"/{i}") for i in range(4)))
    await settle()
    assert not transport.is_reading
    release.set()
    await settle(40)
    assert transport.is_reading
    assert [r.body for r in read_responses(transport.written)] == [b"/0", b"/1", b"/2", b"/3"]


@run_async
async def test_shutdown_lets_the_running_request_finish_with_connection_close():
    protocol, transport = connect(echo)
    protocol.data_received(get("/a?delay=0.03") + get("/b"))
    await settle()
    protocol.begin_shutdown()
    await asyncio.sleep(0.06)
    (response,) = read_responses(transport.written)
    assert response.status == 200 and response.getheader("connection") == "close" and transport.has_sent_eof

    idle_protocol, idle_transport = connect(echo)
    idle_protocol.begin_shutdown()
    assert idle_transport.has_sent_eof


@run_async
async def test_a_stream_that_fails_midway_is_truncated_and_the_connection_closed():
    async def stream(request):
        async def body():
            yield b"data: 1\n\n"
            raise RuntimeError("engine exploded")

        return StreamingResponse(200, body())

    protocol, transport = connect(stream)
    protocol.data_received(get("/s") + get("/never"))
    await settle()
    assert transport.written.endswith(b"9\r\ndata: 1\n\n\r\n")  # no terminating 0-chunk
    assert transport.has_sent_eof and b"engine exploded" not in transport.written


class WriteLog(list):
    """The transport's writes, one entry per write call."""


def logging_writes(transport) -> WriteLog:
    log, write = WriteLog(), transport.write

    def logged(data):
        log.append(bytes(data))
        write(data)

    transport.write = logged
    return log


@run_async
async def test_chunks_ready_together_go_out_in_one_write_and_unchanged():
    """A producer that ran ahead (chunks ready without waiting) costs one
    send per loop iteration, not one per chunk; the bytes are those of
    writing each chunk alone."""
    release = asyncio.Event()

    async def stream(request):
        async def body():
            yield b"data: 0\n\n"
            await release.wait()  # the engine: deltas 1-3 arrive together
            for i in (1, 2, 3):
                yield b"data: %d\n\n" % i

        return StreamingResponse(200, body())

    protocol, transport = connect(stream)
    writes = logging_writes(transport)
    protocol.data_received(get("/s"))
    await settle()
    assert len(writes) == 1 and writes[0].endswith(b"9\r\ndata: 0\n\n\r\n")  # head + first chunk
    release.set()
    await settle()
    assert writes[1:] == [b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n9\r\ndata: 3\n\n\r\n0\r\n\r\n"]
    [response] = read_responses(transport.written)
    assert response.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\n"


@run_async
async def test_a_chunk_is_written_before_writing_pauses_it():
    async def stream(request):
        async def body():
            yield b"data: 0\n\n"
            protocol.pause_writing()  # the transport's buffer filled up
            yield b"data: 1\n\n"

        return StreamingResponse(200, body())

    protocol, transport = connect(stream)
    protocol.data_received(get("/s"))
    await settle()
    assert transport.written.endswith(b"9\r\ndata: 0\n\n\r\n")  # not held back while waiting
    protocol.resume_writing()
    await settle()
    assert read_responses(transport.written)[0].body == b"data: 0\n\ndata: 1\n\n"
