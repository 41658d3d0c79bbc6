"""The engine loop: one thread owns the scheduler and the model runner, so
model work never blocks the caller's event loop. Other threads talk to it
only through a command queue; outputs go back through per-request sinks."""

import logging
import queue
import threading
from typing import Callable, Dict, Optional

from pyvlm.engine.request import Request, RequestOutput

logger = logging.getLogger("pyvlm.engine")

Sink = Callable[[Optional[RequestOutput], Optional[BaseException]], None]
"""Called from the engine thread with (output, None) or (None, error)."""


class EngineLoop:
    """Runs scheduler steps in a background thread (see the module docstring)."""

    def __init__(self, scheduler, runner):
        self.scheduler, self.runner = scheduler, runner
        self._commands: "queue.Queue" = queue.Queue()
        self._sinks: Dict[str, Sink] = {}
        self._thread = threading.Thread(target=self._run, name="pyvlm-engine", daemon=True)
        self._stopping = False
        self._thread.start()

    def submit(self, request: Request, sink: Sink) -> None:
        self._commands.put(("add", request, sink))

    def abort(self, rid: str) -> None:
        self._commands.put(("abort", rid, None))

    def call(self, fn: Callable[[], object]) -> object:
        """Runs fn on the engine thread (between steps) and returns its result."""
        done: "queue.Queue" = queue.Queue(maxsize=1)
        self._commands.put(("call", fn, done))
        ok, value = self.wait(done)
        if not ok:
            raise value
        return value

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def wait(self, results: "queue.Queue"):
        """results.get(), but raises if the engine thread is gone (never hangs)."""
        while True:
            try:
                return results.get(timeout=0.5)
            except queue.Empty:
                if not self.is_alive():
                    raise RuntimeError("the engine is not running (shut down or crashed)")

    def stop(self, timeout: float = 30.0) -> None:
        self._commands.put(("stop", None, None))
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping:
            self._drain_commands(block=not self.scheduler.has_work())
            if self._stopping or not self.scheduler.has_work():
                continue
            try:
                outputs = self.scheduler.step(self.runner)
            except BaseException as exc:  # a bug: fail what is in flight, keep serving
                logger.exception("engine step failed")
                self._fail_all(exc)
                continue
            self._deliver(outputs)
        self._fail_all(RuntimeError("the engine was shut down"))

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(block=block)
            while True:
                try:
                    self._execute(*command)
                except Exception:  # a bug in one command must not stop the engine
                    logger.exception("engine command %r failed", command[0])
                command = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _execute(self, kind: str, arg, extra) -> None:
        if kind == "add":
            self._add(arg, extra)
        elif kind == "abort":
            final = self.scheduler.abort(arg)
            self._deliver([final] if final is not None else [])
        elif kind == "call":
            self._call(arg, extra)
        elif kind == "stop":
            self._stopping = True

    def _add(self, request: Request, sink: Sink) -> None:
        try:
            self.scheduler.add_request(request)
        except ValueError as exc:  # refused (e.g. longer than the context)
            _send(sink, None, exc)
            return
        self._sinks[request.rid] = sink

    def _call(self, fn, done: "queue.Queue") -> None:
        try:
            done.put((True, fn()))
        except BaseException as exc:
            done.put((False, exc))

    def _deliver(self, outputs) -> None:
        for out in outputs:
            sink = self._sinks.get(out.rid)
            if sink is None:
                continue
            if out.finished:
                del self._sinks[out.rid]
            if not _send(sink, out, None) and not out.finished:
                # The receiver is gone (e.g. its event loop closed): stop the work.
                del self._sinks[out.rid]
                self.scheduler.abort(out.rid)

    def _fail_all(self, exc: BaseException) -> None:
        sinks, self._sinks = self._sinks, {}
        for rid, sink in sinks.items():
            try:
                self.scheduler.abort(rid)
            except Exception:  # the scheduler may be what failed
                logger.exception("abort after a failed step")
            _send(sink, None, exc)


def _send(sink: Sink, out: Optional[RequestOutput], err: Optional[BaseException]) -> bool:
    """Calls a sink; a failing receiver must never take the engine thread down."""
    try:
        sink(out, err)
        return True
    except Exception:
        logger.warning("dropping the output of a request whose receiver failed", exc_info=True)
        return False
