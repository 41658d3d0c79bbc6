"""A small asyncio HTTP/1.1 client for the load tools (standard library only,
no torch, no openai): one request per connection (`Connection: close`), whole
answers or server-sent events read as they arrive, with a deadline on every
request, and the option to drop the connection in the middle of a stream.

Only loopback servers are accepted: the load tools must never reach beyond
this machine.
"""

import asyncio
import ipaddress
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Server:
    """Where requests go: a loopback host and port."""

    host: str
    port: int

    @classmethod
    def from_url(cls, url: str) -> "Server":
        """http://127.0.0.1:30000[/v1] -> Server; refuses anything but loopback."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected http://HOST:PORT, got {url!r}")
        if not is_loopback(parts.hostname):
            raise ValueError(f"{parts.hostname} is not a loopback address; the load tools "
                             "only talk to servers on this machine")
        return cls(parts.hostname, parts.port or 80)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Reply:
    """A whole answer. For a stream, `events` holds the (name, data) of each
    server-sent event and `event_times` when each arrived."""

    status: int
    headers: Dict[str, str]
    body: bytes = b""
    events: List[Tuple[Optional[str], str]] = field(default_factory=list)
    event_times: List[float] = field(default_factory=list)
    closed_early: bool = False  # we dropped the connection (on purpose)

    def json(self):
        return json.loads(self.body)

    @property
    def is_done(self) -> bool:
        """The stream ended with `data: [DONE]`."""
        return bool(self.events) and self.events[-1] == (None, "[DONE]")

    def error_events(self) -> List[dict]:
        return [json.loads(data) for name, data in self.events if name == "error"]


# stop_after(events so far) -> True to drop the connection now
StopRule = Callable[[List[Tuple[Optional[str], str]]], bool]


async def request(server: Server, method: str, path: str, body: Optional[bytes] = None,
                  timeout: float = 60.0, stop_after: Optional[StopRule] = None,
                  headers: Sequence[Tuple[str, str]] = ()) -> Reply:
    """Sends one request (with extra headers) and reads the answer within
    `timeout` seconds (asyncio.TimeoutError past it). An event-stream answer
    is read event by event; stop_after may end it early (the connection is
    closed)."""
    head = _encode(method, path, server, body, headers)
    return await asyncio.wait_for(_exchange(server, head, stop_after), timeout)


async def post_json(server: Server, path: str, payload, **kwargs) -> Reply:
    return await request(server, "POST", path, json.dumps(payload).encode(), **kwargs)


async def send_and_leave(server: Server, path: str, payload, timeout: float = 10.0) -> None:
    """Sends a request and closes the connection without reading a byte."""
    async def go():
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            writer.write(_encode("POST", path, server, json.dumps(payload).encode()))
            await writer.drain()
        finally:
            writer.close()
    await asyncio.wait_for(go(), timeout)


async def _exchange(server: Server, data: bytes, stop_after) -> Reply:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(data)
        await writer.drain()
        status, headers = await _read_head(reader)
        chunks = _body_chunks(reader, headers)
        if status == 200 and headers.get("content-type", "").startswith("text/event-stream"):
            return await _read_events(status, headers, chunks, stop_after)
        parts = [part async for part in chunks]
        return Reply(status, headers, b"".join(parts))
    finally:
        writer.close()


def _encode(method: str, path: str, server: Server, body: Optional[bytes],
            headers: Sequence[Tuple[str, str]] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {server.host}:{server.port}",
             "Connection: close", "Accept: */*", *(f"{k}: {v}" for k, v in headers)]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def _read_head(reader: asyncio.StreamReader) -> Tuple[int, Dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    if len(raw) > MAX_HEAD_BYTES:
        raise ValueError("response head too large")
    status_line, *header_lines = raw.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _body_chunks(reader: asyncio.StreamReader, headers: Dict[str, str]):
    """The body's bytes as they arrive: chunked, by Content-Length, or to EOF."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                return
            if size > MAX_BODY_BYTES:
                raise ValueError("chunk too large")
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if length > MAX_BODY_BYTES:
            raise ValueError("body too large")
        if length:
            yield await reader.readexactly(length)
    else:  # HTTP/1.0 style: the body ends when the connection does
        data = await reader.read()
        if data:
            yield data


async def _read_events(status, headers, chunks, stop_after: Optional[StopRule]) -> Reply:
    reply, pending = Reply(status, headers), b""
    async for chunk in chunks:
        pending += chunk
        *blocks, pending = pending.split(b"\n\n")
        for block in blocks:
            reply.events.append(parse_event(block.decode()))
            reply.event_times.append(time.perf_counter())
            if stop_after is not None and stop_after(reply.events):
                reply.closed_early = True
                return reply
    return reply


def parse_event(block: str) -> Tuple[Optional[str], str]:
    """One SSE block -> (event name or None, data)."""
    name, data = None, []
    for line in block.split("\n"):
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
    return name, "\n".join(data)
