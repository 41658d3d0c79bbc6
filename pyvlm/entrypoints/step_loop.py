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

The same loop runs in the engine process (pyvlm/entrypoints/engine_core.py):
there its sinks buffer outputs and its `flush` sends each step's as one
message, and its StepClock lives in shared memory, so the caller's process
sees a hung step without asking the engine.
"""

import logging
import math
import queue
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional

from pyvlm.scheduling.errors import DeviceFailure, EngineDeadError, RequestFailedError
from pyvlm.scheduling.request import Request, RequestOutput

logger = logging.getLogger("pyvlm.engine")

Sink = Callable[[Optional[RequestOutput], Optional[BaseException]], None]
"""Called from the engine thread with (output, None) or (None, error)."""

SHUT_DOWN = "the engine is not running (it was shut down)"


class StepClock:
    """When the running step started, as time.monotonic() (one clock for
    every process of the machine), NaN between steps. cell: an object with
    a float `value` (a multiprocessing RawValue("d") shares the clock with
    another process); default: a plain one."""

    def __init__(self, cell: Any = None):
        self.cell = cell if cell is not None else SimpleNamespace(value=math.nan)
        self.cell.value = math.nan

    def start(self) -> None:
        self.cell.value = time.monotonic()

    def stop(self) -> None:
        self.cell.value = math.nan

    def running_for(self) -> Optional[float]:
        """Seconds the current step has been running, None between steps."""
        started = self.cell.value
        return None if math.isnan(started) else time.monotonic() - started


class StepLoop:
    """Runs scheduler steps in a background thread (see the module docstring).

    clock: where step start times go (default: a clock of this process).
    flush: called on the engine thread after each round of deliveries (a
    step's outputs, a batch of commands, the close), so sinks that buffer
    can send one message per step.
    """

    def __init__(self, scheduler, runner, clock: Optional[StepClock] = None,
                 flush: Callable[[], None] = lambda: None):
        self.scheduler, self.runner = scheduler, runner
        self.failure: Optional[str] = None  # set when a fatal error stopped the loop
        self.clock = clock or StepClock()
        self._flush = flush
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
        self.call_async(fn, done)
        ok, value = self.wait(done)
        if not ok:
            raise value
        return value

    def call_async(self, fn: Callable[[], object], done) -> None:
        """Runs fn on the engine thread (between steps) without waiting:
        done.put((True, result)) or done.put((False, error)), from the
        engine thread, or at once from this one if the loop has stopped."""
        self._put(("call", fn, done))

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def step_running_for(self) -> Optional[float]:
        """Seconds the current step has been running, None between steps."""
        return self.clock.running_for()

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
                self._flush()
                if self._stopping or not self.scheduler.has_work():
                    continue
                outputs = self._step()
                if outputs is None:
                    break
                self._deliver(outputs)
                self._flush()
        finally:
            self._close()

    def _step(self) -> Optional[list]:
        """One scheduler step's outputs; None when the loop must stop."""
        self.clock.start()
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
            self.clock.stop()

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
                break
        self._flush()

    def _refuse(self, command) -> None:
        kind, arg, extra = command
        if kind == "add":
            send_to_sink(extra, None, self._dead_error())
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
            send_to_sink(sink, None, exc)
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
                send_to_sink(sink, None, RequestFailedError(out.error))
            elif not send_to_sink(sink, out, None) and not out.finished:
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
            send_to_sink(sink, None, exc)


def send_to_sink(sink: Sink, out: Optional[RequestOutput], err: Optional[BaseException]) -> bool:
    """Calls a sink; a failing receiver must never take the engine thread down."""
    try:
        sink(out, err)
        return True
    except Exception:
        logger.warning("dropping the output of a request whose receiver failed", exc_info=True)
        return False
