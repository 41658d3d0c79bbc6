"""`serve(handler, host, port, limits=...)`: run the HTTP server until `stop`
is set, then shut down gracefully. Run it on uvloop (`new_event_loop()`)."""

import asyncio
import logging
import time
from typing import List, Optional, Set, Tuple

from pyvlm.http.limits import HttpLimits
from pyvlm.http.protocol import HttpProtocol
from pyvlm.http.types import Handler

__all__ = ["HttpLimits", "HttpServer", "serve", "new_event_loop"]
logger = logging.getLogger(__name__)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop when uvloop is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class HttpServer:
    """A listening socket plus its live connections."""

    def __init__(self, handler: Handler, limits: HttpLimits = HttpLimits()):
        self.handler = handler
        self.limits = limits
        self.connections: Set[HttpProtocol] = set()
        self._server: Optional[asyncio.AbstractServer] = None

    async def start(self, host: str, port: int, **server_options) -> None:
        """Bind and start accepting (port 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpProtocol(self.handler, self.limits, self.connections),
            host, port, reuse_address=True, backlog=1024, **server_options,
        )  # fmt: skip

    @property
    def addresses(self) -> List[Tuple[str, int]]:
        """(host, port) of each listening socket."""
        return [tuple(sock.getsockname()[:2]) for sock in self._server.sockets]

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    async def shutdown(self, grace_s: Optional[float] = None) -> None:
        """Stop accepting, close idle connections, let in-flight requests
        finish within `grace_s`, then drop whatever is left."""
        grace_s = self.limits.shutdown_grace_s if grace_s is None else grace_s
        self._server.close()
        for connection in list(self.connections):
            connection.begin_shutdown()
        deadline = time.monotonic() + grace_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()
        await self._wait_connections_gone()
        await self._server.wait_closed()

    async def _wait_connections_gone(self, timeout_s: float = 1.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # connection_lost runs on a later loop turn


async def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    limits: HttpLimits = HttpLimits(),
    ready: Optional[asyncio.Event] = None,
    stop: Optional[asyncio.Event] = None,
) -> None:
    """Serve until `stop` is set (forever if None), then shut down
    gracefully: in-flight handlers get `limits.shutdown_grace_s` to finish,
    after which their connections are dropped (cancelling the handlers)."""
    server = HttpServer(handler, limits)
    await server.start(host, port)
    logger.info("listening on %s", ", ".join(f"http://{h}:{p}" for h, p in server.addresses))
    if ready is not None:
        ready.set()
    try:
        await (stop.wait() if stop is not None else asyncio.Future())
    finally:
        await server.shutdown()
