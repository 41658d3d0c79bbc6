"""Server-sent events framing (https://html.spec.whatwg.org/#server-sent-events)."""

import orjson

from pyvlm.server.errors import ApiError

DONE = b"data: [DONE]\n\n"


def sse_data(obj) -> bytes:
    """One `data:` event; orjson output holds no newline, so one line."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_error(error: ApiError) -> bytes:
    """An `error` event (the openai client raises APIError on it)."""
    return b"event: error\ndata: " + orjson.dumps(error.body()) + b"\n\n"
