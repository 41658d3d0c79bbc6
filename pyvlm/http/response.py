"""Serialising responses: the status line and headers, chunked framing."""

import re
from http import HTTPStatus
from typing import Optional

from pyvlm.http.errors import error_body
from pyvlm.http.types import Headers, Response

LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LINE_BREAK = re.compile(r"[\r\n\x00]")
_FRAMING_HEADERS = {"content-length", "transfer-encoding", "connection", "content-type"}


_REASONS = {status.value: status.phrase for status in HTTPStatus}


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Unknown")


def encode_head(
    status: int,
    headers: Headers,
    content_type: Optional[str],
    *,
    content_length: Optional[int],
    keep_alive: bool,
    http_version: str = "1.1",
) -> bytes:
    """Status line and header block. `content_length=None` means a chunked
    body on HTTP/1.1 and a close-delimited one on HTTP/1.0. Framing headers
    are the protocol's: the application's copies are dropped."""
    lines = [f"HTTP/1.1 {status} {reason_phrase(status)}"]
    if content_type:
        lines.append(f"content-type: {content_type}")
    if content_length is not None:
        lines.append(f"content-length: {content_length}")
    elif http_version == "1.1":
        lines.append("transfer-encoding: chunked")
    lines.append("connection: keep-alive" if keep_alive else "connection: close")
    lines.extend(f"{name}: {value}" for name, value in headers if name.lower() not in _FRAMING_HEADERS)
    if any(_LINE_BREAK.search(line) for line in lines):
        raise ValueError("a response header contains a line break")  # would allow response splitting
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never the empty, terminating chunk)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def error_response(status: int, message: str, headers: Optional[Headers] = None) -> Response:
    """An OpenAI-shaped JSON error response."""
    return Response(status=status, body=error_body(status, message), headers=list(headers or []))
