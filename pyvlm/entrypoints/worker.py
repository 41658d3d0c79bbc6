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
        ok, value = done.get()
        if not ok:
            raise value
        return value

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
                self._execute(*command)
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
            sink(None, exc)
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
            sink(out, None)

    def _fail_all(self, exc: BaseException) -> None:
        sinks, self._sinks = self._sinks, {}
        for rid, sink in sinks.items():
            try:
                self.scheduler.abort(rid)
            except Exception:  # the scheduler may be what failed
                logger.exception("abort after a failed step")
            sink(None, exc)
