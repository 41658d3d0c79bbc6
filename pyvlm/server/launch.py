"""`python -m pyvlm`: serve until SIGTERM/SIGINT, then shut down cleanly.

The port is bound before the engine loads: a port that cannot be bound
(already in use, say) ends the process at once with exit status 2 and one
log line naming it. While the engine loads the port answers 503; "Ready:
serving ..." is logged once, when requests succeed. On a
signal: /health turns 503, the listener stops accepting, in-flight requests
get `shutdown_grace_s` to finish (then the engine aborts them), the engine
stops, and the process exits 0. A watchdog exits non-zero if the engine
stops after a device failure or its engine process dies (4), or one step
outlasts --watchdog-timeout (3, with every thread's stack on stderr, the
engine process's too). The engine process (--engine-process) is stopped
with the engine on every way out but exit 3, where it exits by itself when
this process's end of its connection closes."""

import asyncio
import errno
import faulthandler
import logging
import os
import signal
import sys
from typing import Callable, List, Optional, Tuple

from pyvlm.heap import tune_for_serving
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
        self._restore_gc: Callable[[], None] = lambda: None

    async def handle(self, request):
        if self.app is None:
            return unavailable("The server is starting").to_response()
        return await self.app(request)

    async def run(self) -> int:
        self._install_signal_handlers()
        server = await self._listen()
        if server is None:
            return self.exit_code
        try:
            await self._start_app(server)
            if self.app is not None:
                watchdog = asyncio.ensure_future(self._watchdog())
                await self.stop.wait()
                watchdog.cancel()
                self.app.begin_shutdown()
            self.stop.set()
            await server.shutdown()
        finally:
            await self._stop_engine()
            self._restore_gc()
        return self.exit_code

    async def _listen(self):
        """The bound HttpServer (answering 503 until the app is set), or None
        with exit_code 2 and the reason logged when the port cannot be bound."""
        from pyvlm.http.server import HttpLimits, HttpServer

        limits = HttpLimits(max_body_bytes=self.args.max_request_bytes,
                            shutdown_grace_s=self.args.shutdown_grace_s)
        server = HttpServer(self.handle, limits)
        try:
            await server.start(self.args.host, self.args.port)
        except OSError as exc:
            logger.error("%s", cannot_listen_message(self.args.host, self.args.port, exc))
            self.exit_code = 2
            return None
        logger.info("Loading %s; until it is loaded, %s answers 503",
                    self.args.model_name, urls_of(server.addresses)[0])
        return server

    async def _start_app(self, server) -> None:
        from pyvlm.server.app import App

        loop = asyncio.get_running_loop()
        try:
            self.engine = await loop.run_in_executor(None, self.make_engine, self.args)
            self.app = App(self.engine, self.args)
        except Exception as exc:
            logger.error("cannot start: %s", exc)
            self.exit_code = 2
            return
        self._restore_gc = tune_for_serving()  # (pyvlm/heap.py)
        if self.stop.is_set():
            return  # a signal came during the load: shutting down, never ready
        # Logged after self.app is set: from here on every request is served.
        logger.info("Ready: serving %s at %s (OpenAI API under /v1)", self.args.model_name,
                    ", ".join(urls_of(server.addresses)))

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
        """Ends the process when the engine can no longer serve: stopped by a
        device failure (exit 4, after the usual shutdown: in-flight requests
        already got 503), or hung in one step past --watchdog-timeout (exit
        3 at once, after dumping every thread's stack to stderr: a thread
        stuck in a step can be neither interrupted nor joined)."""
        interval = min(1.0, self.args.watchdog_timeout / 4)
        while not self.stop.is_set():
            await asyncio.sleep(interval)
            failure = self.engine.health()
            if failure is not None:
                logger.critical("the engine stopped (%s); exiting for a restart", failure)
                self.exit_code = 4
                self.app.begin_shutdown()
                self.stop.set()
                return
            running_for = self.engine.step_running_for()
            if running_for is not None and running_for > self.args.watchdog_timeout:
                dump_engine_stacks = getattr(self.engine, "dump_engine_stacks", None)
                if dump_engine_stacks is not None:
                    dump_engine_stacks()
                exit_hung(running_for, self.args.watchdog_timeout)

    async def _stop_engine(self) -> None:
        if self.engine is not None:
            # Whatever is still running after the grace period is failed by the
            # engine's shutdown (its callers get an error and end their streams).
            await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)


def exit_hung(running_for: float, timeout: float) -> None:
    """Logs the hung step, dumps all threads' stacks to stderr and exits 3."""
    logger.critical("watchdog: an engine step has run for %.1f s (--watchdog-timeout %g s); "
                    "dumping the threads' stacks and exiting", running_for, timeout)
    for handler in logging.getLogger().handlers:
        handler.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(3)


def cannot_listen_message(host: str, port: int, error: OSError) -> str:
    """One line saying why host:port cannot be bound (and what to do when it is taken)."""
    if error.errno == errno.EADDRINUSE:
        return (f"cannot listen on {host}:{port}: port {port} is already in use (is another "
                "server running? choose a free port with --port)")
    # asyncio's strerror repeats the address; the errno's own text is enough.
    # (getaddrinfo errors have negative codes and their own strerror.)
    is_os_errno = isinstance(error.errno, int) and error.errno > 0
    reason = os.strerror(error.errno) if is_os_errno else (error.strerror or str(error))
    return f"cannot listen on {host}:{port}: {reason}"


def urls_of(addresses: List[Tuple[str, int]]) -> List[str]:
    """http:// URLs of bound (host, port) pairs, IPv6 hosts in brackets."""
    return [f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            for host, port in addresses]


def _make_engine(args: ServerArgs):
    from pyvlm import Engine

    return Engine(**args.engine_kwargs())


def run_server(args: ServerArgs, make_engine: Optional[Callable] = None) -> int:
    """Serves until a signal (on uvloop when installed); returns the exit
    status. make_engine(args) builds the engine (default: pyvlm.Engine)."""
    return run_loop(Launcher(args, make_engine).run())


def run_loop(main) -> int:
    """Runs the coroutine main to its end, on uvloop when installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
