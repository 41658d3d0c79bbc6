"""The step loop: one thread (the engine thread) owns the scheduler and the
model runner and runs scheduler steps, so model work never blocks the caller's
event loop. Other threads talk to it only through a command queue; outputs go
back through per-request sinks.

Failures: a request the model fails on ends alone (the scheduler isolates
it, see pyvlm.scheduling.isolation) with RequestFailedError. A DeviceFailure
(the GPU is unusable) stops the loop for good: every request in flight and
every later one gets EngineDeadError, and `failure` says why, so the server
can turn unhealthy and exit for its supervisor to restart it. Once the loop
has stopped, for whatever reason, no submitted request is left waiting.
"""

import logging
import queue
import threading
import time
from typing import Callable, Dict, Optional

from pyvlm.scheduling.errors import DeviceFailure, EngineDeadError, RequestFailedError
from pyvlm.scheduling.request import Request, RequestOutput

logger = logging.getLogger("pyvlm.engine")

Sink = Callable[[Optional[RequestOutput], Optional[BaseException]], None]
"""Called from the engine thread with (output, None) or (None, error)."""

SHUT_DOWN = "the engine is not running (it was shut down)"


class StepLoop:
    """Runs scheduler steps in a background thread (see the module docstring)."""

    def __init__(self, scheduler, runner):
        self.scheduler, self.runner = scheduler, runner
        self.failure: Optional[str] = None  # set when a fatal error stopped the loop
        self.step_started_at: Optional[float] = None  # time.monotonic() of the running step
        self._commands: "queue.Queue" = queue.Queue()
        self._sinks: Dict[str, Sink] = {}
        self._closed = False  # no command is taken any more
        self._lock = threading.Lock()  # orders submissions against closing
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pyvlm-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request, sink: Sink) -> None:
        self._put(("add", request, sink))

    def abort(self, rid: str) -> None:
        self._put(("abort", rid, None))

    def call(self, fn: Callable[[], object]) -> object:
        """Runs fn on the engine thread (between steps) and returns its result."""
        done: "queue.Queue" = queue.Queue(maxsize=1)
        self._put(("call", fn, done))
        ok, value = self.wait(done)
        if not ok:
            raise value
        return value

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def step_running_for(self) -> Optional[float]:
        """Seconds the current step has been running, None between steps."""
        started = self.step_started_at
        return None if started is None else time.monotonic() - started

    def wait(self, results: "queue.Queue"):
        """results.get(), but raises if the engine thread is gone (never hangs)."""
        while True:
            try:
                return results.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise self._dead_error() from None

    def stop(self, timeout: float = 30.0) -> None:
        self._put(("stop", None, None))
        self._thread.join(timeout)

    # ---- the engine thread -------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_commands(block=not self.scheduler.has_work())
                if self._stopping or not self.scheduler.has_work():
                    continue
                outputs = self._step()
                if outputs is None:
                    break
                self._deliver(outputs)
        finally:
            self._close()

    def _step(self) -> Optional[list]:
        """One scheduler step's outputs; None when the loop must stop."""
        self.step_started_at = time.monotonic()
        try:
            return self.scheduler.step(self.runner)
        except DeviceFailure as exc:
            self.failure = f"the device failed: {exc}"
            logger.critical("engine stopped: %s", self.failure)
            return None
        except Exception as exc:  # a scheduler bug: fail what is in flight, keep serving
            logger.exception("engine step failed")
            self._fail_all(RequestFailedError(f"the engine failed ({type(exc).__name__})"))
            return []
        finally:
            self.step_started_at = None

    def _put(self, command) -> None:
        with self._lock:
            if not self._closed:
                self._commands.put(command)
                return
        self._refuse(command)

    def _close(self) -> None:
        """Stops taking commands; fails the requests in flight and every
        command still queued, so nobody waits for an engine that is gone."""
        with self._lock:
            self._closed = True
        self._fail_all(self._dead_error())
        while True:
            try:
                self._refuse(self._commands.get_nowait())
            except queue.Empty:
                return

    def _refuse(self, command) -> None:
        kind, arg, extra = command
        if kind == "add":
            _send(extra, None, self._dead_error())
        elif kind == "call":
            extra.put((False, self._dead_error()))

    def _dead_error(self) -> EngineDeadError:
        return EngineDeadError(self.failure or SHUT_DOWN)

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
            if out.error is not None:
                _send(sink, None, RequestFailedError(out.error))
            elif not _send(sink, out, None) and not out.finished:
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
