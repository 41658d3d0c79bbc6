"""Server-sent events framing (WHATWG HTML, "Server-sent events")."""

import re
from typing import Optional, Union

SSE_DONE = b"data: [DONE]\n\n"  # OpenAI's end-of-stream sentinel
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def sse_event(data: Union[bytes, str], event: Optional[str] = None) -> bytes:
    """One event: an optional `event:` line, one `data:` line per line of
    `data` (a client joins them with "\\n"), then a blank line."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    head = b""
    if event is not None:
        if _LINE_BREAK.search(event.encode("utf-8")):
            raise ValueError("an SSE event name cannot contain a line break")
        head = b"event: " + event.encode("utf-8") + b"\n"
    lines = _LINE_BREAK.split(data)
    return head + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


def sse_comment(text: str = "") -> bytes:
    """A comment line, ignored by clients; useful as a keep-alive ping."""
    if _LINE_BREAK.search(text.encode("utf-8")):
        raise ValueError("an SSE comment cannot contain a line break")
    return b": " + text.encode("utf-8") + b"\n\n"
