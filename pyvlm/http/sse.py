"""Server-sent events framing (WHATWG HTML, "Server-sent events")."""

import re
from typing import Any, Optional, Union

import orjson

SSE_DONE = b"data: [DONE]\n\n"  # OpenAI's end-of-stream sentinel
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def _event_line(event: Optional[str]) -> bytes:
    if event is None:
        return b""
    name = event.encode("utf-8")
    if _LINE_BREAK.search(name):
        raise ValueError("an SSE event name cannot contain a line break")
    return b"event: " + name + b"\n"


def sse_event(data: Union[bytes, str], event: Optional[str] = None) -> bytes:
    """One event: an optional `event:` line, one `data:` line per line of
    `data` (a client joins them with "\\n"), then a blank line."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    lines = _LINE_BREAK.split(data)
    return _event_line(event) + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


def sse_json(obj: Any, event: Optional[str] = None) -> bytes:
    """One event whose data is obj as JSON. JSON escapes the line breaks
    inside strings and orjson writes no others, so the data is one line and
    needs no splitting (the streaming hot path: one event per token)."""
    return _event_line(event) + b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_comment(text: str = "") -> bytes:
    """A comment line, ignored by clients; useful as a keep-alive ping."""
    if _LINE_BREAK.search(text.encode("utf-8")):
        raise ValueError("an SSE comment cannot contain a line break")
    return b": " + text.encode("utf-8") + b"\n\n"
