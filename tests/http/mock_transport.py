"""A transport with no socket behind it, and helpers to read what the
protocol wrote back with the standard library's HTTP response parser."""

import asyncio
import http.client
import io
from typing import List

from pyvlm.http.limits import HttpLimits
from pyvlm.http.protocol import HttpProtocol


class MockTransport(asyncio.Transport):
    def __init__(self, protocol: asyncio.Protocol):
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.is_reading = True
        self.is_closed = False
        self.has_sent_eof = False
        self.buffer_limits = None

    def write(self, data: bytes) -> None:
        assert not self.is_closed and not self.has_sent_eof, "write after close"
        self.written += data

    def is_closing(self) -> bool:
        return self.is_closed

    def close(self) -> None:
        if not self.is_closed:
            self.is_closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    abort = close

    def pause_reading(self) -> None:
        self.is_reading = False

    def resume_reading(self) -> None:
        self.is_reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.has_sent_eof = True

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.buffer_limits = (high, low)

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default


def connect(handler, **limits) -> "tuple[HttpProtocol, MockTransport]":
    """A protocol wired to a mock transport (call inside a running loop)."""
    protocol = HttpProtocol(handler, HttpLimits(**limits))
    transport = MockTransport(protocol)
    protocol.connection_made(transport)
    return protocol, transport


class _UnclosableBytesIO(io.BytesIO):
    def close(self) -> None:
        pass  # HTTPResponse closes its file after each body; the next response follows


class _Stream:
    def __init__(self, data: bytes):
        self.file = _UnclosableBytesIO(data)

    def makefile(self, mode):
        return self.file


def read_responses(data: bytes, methods=None) -> List[http.client.HTTPResponse]:
    """Parse back-to-back responses; each has `.body` read completely."""
    stream, responses = _Stream(bytes(data)), []
    while stream.file.tell() < len(data):
        response = http.client.HTTPResponse(stream, method=(methods or {}).get(len(responses), "GET"))
        response.begin()
        response.body = response.read()
        responses.append(response)
    return responses


async def settle(num_turns: int = 20) -> None:
    """Let the loop run pending callbacks and tasks."""
    for _ in range(num_turns):
        await asyncio.sleep(0)
