"""A sans-IO HTTP/1.1 request parser (RFC 9112): bytes in, events out.

    parser = RequestParser(ParserLimits())
    parser.receive_data(data)          # b"" means the peer closed
    while (event := parser.next_event()) is not NEED_DATA: ...

Events: RequestHead, BodyData, EndOfRequest, ConnectionClosed. A malformed
or refused request raises ProtocolError(status, message) from next_event,
and the parser stays failed. After a request that does not keep the
connection alive, the parser ignores everything else it is given.
"""

import re
from typing import List, Optional, Tuple

from pyvlm.http.errors import ProtocolError
from pyvlm.http.events import (  # noqa: F401  (re-exported)
    NEED_DATA,
    BodyData,
    ConnectionClosed,
    EndOfRequest,
    ParserLimits,
    RequestHead,
)
from pyvlm.http.head import build_head, parse_header_lines
from pyvlm.http.receive_buffer import BLANK_LINE, LINE_END, ReceiveBuffer


_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(;[^\x00-\x08\x0a-\x1f\x7f]*)?")
_HEAD, _BODY, _CHUNK_SIZE_LINE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _DONE = range(7)


class RequestParser:
    """Parses a stream of pipelined requests from one connection."""

    def __init__(self, limits: ParserLimits = ParserLimits()):
        self.limits = limits
        self._buffer = ReceiveBuffer()
        self._state = _HEAD
        self._is_eof = False
        self._error: Optional[ProtocolError] = None
        self._remaining = 0  # body or chunk bytes still to come
        self._body_bytes = 0  # chunked: total declared so far

    # -- input -----------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; b"" means end of stream."""
        if not data:
            self._is_eof = True
        elif self._state != _DONE and not self._is_eof:
            self._buffer.append(data)

    @property
    def num_buffered_bytes(self) -> int:
        return len(self._buffer)

    @property
    def phase(self) -> str:
        """"idle" (between requests, nothing buffered), "head", "body",
        "done" (no further request on this connection) or "error"."""
        if self._error is not None:
            return "error"
        if self._state == _DONE:
            return "done"
        if self._state == _HEAD:
            return "head" if len(self._buffer) else "idle"
        return "body"

    # -- output ----------------------------------------------------------
    def next_event(self):
        """The next event, NEED_DATA, or raise ProtocolError."""
        if self._error is not None:
            raise self._error
        try:
            event = self._next_event()
        except ProtocolError as error:
            self._error = error
            self._buffer.clear()
            raise
        if event is NEED_DATA and self._is_eof:
            return self._at_eof()
        return event

    def _at_eof(self):
        if self._state in (_HEAD, _DONE) and not len(self._buffer):
            return ConnectionClosed()
        self._error = ProtocolError(400, "the connection closed in the middle of a request")
        raise self._error

    def _next_event(self):
        state = self._state
        if state == _HEAD:
            return self._read_head()
        if state == _BODY:
            return self._read_fixed_body()
        if state == _CHUNK_SIZE_LINE:
            return self._read_chunk_size()
        if state == _CHUNK_DATA:
            return self._read_chunk_data()
        if state == _CHUNK_END:
            return self._read_chunk_end()
        if state == _TRAILERS:
            return self._read_trailers()
        return NEED_DATA

    # -- head --------------------------------------------------------------
    def _read_head(self):
        self._skip_leading_blank_lines()  # RFC 9112 2.2: SHOULD ignore them
        end = self._buffer.find_end(BLANK_LINE, 3)
        limit = self.limits.max_header_bytes
        if (end is None and len(self._buffer) > limit) or (end is not None and end > limit):
            raise ProtocolError(431, f"the request line and headers exceed {limit} bytes")
        if end is None:
            return NEED_DATA
        head = build_head(self._buffer.extract(end), self.limits)
        self._start_body(head)
        return head

    def _skip_leading_blank_lines(self) -> None:
        while self._buffer.startswith(b"\r\n") or self._buffer.startswith(b"\n"):
            self._buffer.extract(2 if self._buffer.startswith(b"\r") else 1)

    def _start_body(self, head: RequestHead) -> None:
        self._keep_alive = head.keep_alive
        if head.is_chunked:
            self._state, self._body_bytes = _CHUNK_SIZE_LINE, 0
        else:
            self._state, self._remaining = _BODY, head.content_length or 0

    def _finish_request(self) -> EndOfRequest:
        self._state = _HEAD if self._keep_alive else _DONE
        if self._state == _DONE:
            self._buffer.clear()
        return EndOfRequest()

    # -- bodies ------------------------------------------------------------
    def _read_fixed_body(self):
        if self._remaining == 0:
            return self._finish_request()
        return self._take_body_bytes()

    def _take_body_bytes(self):
        if not len(self._buffer):
            return NEED_DATA
        data = self._buffer.extract(self._remaining)
        self._remaining -= len(data)
        return BodyData(data)

    def _read_chunk_size(self):
        line = self._take_line(self.limits.max_chunk_line_bytes, 400, "chunk size line too long")
        if line is None:
            return NEED_DATA
        match = _CHUNK_SIZE.fullmatch(line)
        if match is None:
            raise ProtocolError(400, "malformed chunk size line")
        size = int(match.group(1), 16)
        self._body_bytes += size
        if self._body_bytes > self.limits.max_body_bytes:
            raise ProtocolError(413, f"the request body exceeds {self.limits.max_body_bytes} bytes")
        self._state, self._remaining = (_CHUNK_DATA, size) if size else (_TRAILERS, 0)
        return self._next_event()

    def _read_chunk_data(self):
        if self._remaining == 0:
            self._state = _CHUNK_END
            return self._read_chunk_end()
        return self._take_body_bytes()

    def _read_chunk_end(self):
        if self._buffer.startswith(b"\r\n") or self._buffer.startswith(b"\n"):
            self._buffer.extract(2 if self._buffer.startswith(b"\r") else 1)
            self._state = _CHUNK_SIZE_LINE
            return self._read_chunk_size()
        if len(self._buffer) == 0 or (len(self._buffer) == 1 and self._buffer.startswith(b"\r")):
            return NEED_DATA
        raise ProtocolError(400, "chunk data is not followed by CRLF")

    def _read_trailers(self):
        if self._buffer.startswith(b"\r\n") or self._buffer.startswith(b"\n"):
            self._buffer.extract(2 if self._buffer.startswith(b"\r") else 1)
            return self._finish_request()
        if len(self._buffer) == 1 and self._buffer.startswith(b"\r"):
            return NEED_DATA
        end = self._buffer.find_end(BLANK_LINE, 3)
        limit = self.limits.max_header_bytes
        if (end is None and len(self._buffer) > limit) or (end is not None and end > limit):
            raise ProtocolError(431, f"the trailers exceed {limit} bytes")
        if end is None:
            return NEED_DATA
        parse_header_lines(_split_lines(self._buffer.extract(end))[:-2], self.limits)  # validated, dropped
        return self._finish_request()

    def _take_line(self, max_bytes: int, status: int, message: str) -> Optional[bytes]:
        end = self._buffer.find_end(LINE_END, 1)
        # Incomplete, the line may still be max_bytes + CR with its LF to come.
        if (end is None and len(self._buffer) > max_bytes + 1) or (end is not None and end > max_bytes + 2):
            raise ProtocolError(status, message)
        if end is None:
            return None
        return _strip_line_end(self._buffer.extract(end))


def _strip_line_end(line: bytes) -> bytes:
    line = line[:-1]
    return line[:-1] if line.endswith(b"\r") else line


def _split_lines(section: bytes) -> List[bytes]:
    return [line[:-1] if line.endswith(b"\r") else line for line in section.split(b"\n")]


def split_target(target: str) -> Tuple[str, str]:
    """(path, query) of an origin-form or absolute-form request target."""
    if not target.startswith("/"):
        scheme_end = target.find("://")
        if scheme_end > 0:
            slash = target.find("/", scheme_end + 3)
            target = target[slash:] if slash >= 0 else "/"
    path, _, query = target.partition("?")
    return path, query
