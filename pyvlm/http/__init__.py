"""HTTP/1.1 on asyncio + uvloop, written by hand: a sans-IO parser, SSE
framing, and an asyncio.Protocol with flow control and timeouts. No torch.

    from pyvlm.http import HttpLimits, Response, serve, new_event_loop
    async def handler(request): return Response(200, b'{"ok": true}')
    new_event_loop().run_until_complete(serve(handler, "127.0.0.1", 30000, limits=HttpLimits()))
"""

from pyvlm.http.errors import ProtocolError, error_body
from pyvlm.http.limits import HttpLimits
from pyvlm.http.response import error_response
from pyvlm.http.server import HttpServer, new_event_loop, serve
from pyvlm.http.sse import SSE_DONE, sse_comment, sse_event, sse_json
from pyvlm.http.types import Handler, Headers, Request, Response, StreamingResponse

__all__ = [
    "Handler", "Headers", "HttpLimits", "HttpServer", "ProtocolError", "Request", "Response",
    "SSE_DONE", "StreamingResponse", "error_body", "error_response", "new_event_loop", "serve",
    "sse_comment", "sse_event", "sse_json",
]  # fmt: skip
