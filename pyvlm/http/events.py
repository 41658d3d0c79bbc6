"""The parser's events and limits: small frozen records."""

from dataclasses import dataclass
from typing import Optional

from pyvlm.http.types import Headers


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()  # next_event: nothing complete yet


@dataclass(frozen=True)
class ParserLimits:
    max_header_bytes: int = 64 * 1024  # request line + headers (and trailers)
    max_header_count: int = 256
    max_body_bytes: int = 64 * 1024 * 1024
    max_chunk_line_bytes: int = 4096  # chunk size + extensions


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    http_version: str  # "1.0" or "1.1"
    headers: Headers  # names lower-cased
    content_length: Optional[int]  # None for a chunked body
    is_chunked: bool
    expects_continue: bool
    keep_alive: bool


@dataclass(frozen=True)
class BodyData:
    data: bytes


@dataclass(frozen=True)
class EndOfRequest:
    pass


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed cleanly between requests."""
