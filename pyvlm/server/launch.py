"""`python -m pyvlm`: serve until SIGTERM/SIGINT, then shut down cleanly.

The port opens at once and answers 503 while the engine loads. On a
signal: /health turns 503, the listener stops accepting, in-flight requests
get `shutdown_grace_s` to finish (then the engine aborts them), the engine
stops, and the process exits 0. A watchdog exits non-zero if the engine
thread dies or one step outlasts --watchdog-timeout."""

import asyncio
import logging
import signal
from typing import Callable, Optional

from pyvlm.server.args import ServerArgs
from pyvlm.server.errors import unavailable

logger = logging.getLogger("pyvlm.server")


class Launcher:
    """Owns the engine, the app and the HTTP server of one process."""

    def __init__(self, args: ServerArgs, make_engine: Optional[Callable] = None):
        self.args, self.make_engine = args, make_engine or _make_engine
        self.app = None
        self.engine = None
        self.stop = asyncio.Event()
        self.exit_code = 0

    async def handle(self, request):
        if self.app is None:
            return unavailable("The server is starting").to_response()
        return await self.app(request)

    async def run(self) -> int:
        from pyvlm.http.server import HttpLimits, serve

        self._install_signal_handlers()
        limits = HttpLimits(max_body_bytes=self.args.max_request_bytes)
        server = asyncio.ensure_future(serve(self.handle, self.args.host, self.args.port,
                                             limits=limits, stop=self.stop))
        try:
            await self._start_app()
            if self.app is not None:
                watchdog = asyncio.ensure_future(self._watchdog())
                await self.stop.wait()
                watchdog.cancel()
                self.app.begin_shutdown()
            self.stop.set()
            await server
        finally:
            await self._stop_engine()
        return self.exit_code

    async def _start_app(self) -> None:
        from pyvlm.server.app import App

        loop = asyncio.get_running_loop()
        try:
            self.engine = await loop.run_in_executor(None, self.make_engine, self.args)
            self.app = App(self.engine, self.args)
        except Exception as exc:
            logger.error("cannot start: %s", exc)
            self.exit_code = 2
            return
        logger.info("Serving %s at http://%s:%d (OpenAI API under /v1)", self.args.model_name,
                    self.args.host, self.args.port)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig) -> None:
        logger.info("%s: shutting down (grace %.0f s)", signal.Signals(sig).name,
                    self.args.shutdown_grace_s)
        if self.app is not None:
            self.app.begin_shutdown()
        self.stop.set()

    async def _watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            await asyncio.sleep(min(5.0, self.args.watchdog_timeout))
            try:
                await asyncio.wait_for(loop.run_in_executor(None, self.engine.get_stats),
                                       self.args.watchdog_timeout)
            except (asyncio.TimeoutError, RuntimeError):
                logger.error("watchdog: the engine is hung or dead; exiting")
                self.exit_code = 3
                self.stop.set()

    async def _stop_engine(self) -> None:
        if self.engine is not None:
            # Whatever is still running after the grace period is failed by the
            # engine's shutdown (its callers get an error and end their streams).
            await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)


def _make_engine(args: ServerArgs):
    from pyvlm import Engine

    return Engine(**args.engine_kwargs())


def run_server(args: ServerArgs) -> int:
    """Serves until a signal; returns the exit status."""
    launcher = Launcher(args)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(launcher.run())
    return uvloop.run(launcher.run())
