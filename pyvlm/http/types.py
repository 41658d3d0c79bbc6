"""The contract between the HTTP layer (pyvlm/http) and the application
(pyvlm/server): plain request/response objects and one handler signature.

The protocol parses a request, awaits `handler(request)` in its own task and
writes what comes back. If the client disconnects, that task is cancelled
(the application's `finally` blocks run: e.g. the engine request is
aborted). A StreamingResponse's body is an async iterator of byte chunks;
the protocol awaits the transport's writability between chunks
(backpressure), so a slow reader never grows memory without bound.
"""

from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, List, Optional, Tuple, Union

Headers = List[Tuple[str, str]]  # names lower-cased, in arrival order


@dataclass(frozen=True)
class Request:
    method: str  # upper case, e.g. "POST"
    target: str  # as sent, e.g. "/v1/chat/completions?x=1"
    path: str  # percent-decoded path without the query
    query: str  # raw query string ("" if none)
    headers: Headers
    body: bytes
    http_version: str = "1.1"  # "1.0" or "1.1"
    client: Optional[Tuple[str, int]] = None

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The first header of that (case-insensitive) name."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), default)


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: Headers = field(default_factory=list)  # Content-Length is added by the protocol
    content_type: str = "application/json"


@dataclass
class StreamingResponse:
    """Sent with Transfer-Encoding: chunked (HTTP/1.1) or until close (1.0)."""

    status: int
    body: AsyncIterator[bytes]
    headers: Headers = field(default_factory=list)
    content_type: str = "text/event-stream"


Handler = Callable[[Request], Awaitable[Union[Response, StreamingResponse]]]
