"""CoreClient: the StepLoop interface (submit, abort, is_alive, failure,
wait, stop, step_running_for; command(name) for StepLoop.call) over an
engine process
(pyvlm/entrypoints/engine_core.py), for the Engine and the server in the
caller's process.

Requests go to the engine process over a multiprocessing connection
(pickled; their pixel tensors through shared memory, see
core_channel.py), sent in order by a sender thread, so submitting never
waits on the connection; a reader thread here takes each step's outputs
and calls the requests' sinks, as the engine thread would. The engine's step start
time is a float in shared memory, so step_running_for() answers without
asking the engine process (the server's watchdog sees a hung step).

When the engine process ends unasked (killed, crashed, or stopped by a
device failure), the reader sees the connection close: every request in
flight and every pending call get EngineDeadError at once, `failure` says
why, and later submissions are refused at once. stop() asks the process to
shut down and kills it if it has not within the timeout; the process is
always reaped (no zombie). The process is daemonic: multiprocessing ends it
when the caller's interpreter exits without stop() (so it cannot start
processes of its own through multiprocessing).

Each image tensor in flight holds a file descriptor in both processes
(torch's file_descriptor sharing: nothing named in /dev/shm to leak when a
process dies), so the soft limit on open files is raised to the hard one,
as vLLM and SGLang do.
"""

import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import resource
import signal
import threading
from typing import Dict, Optional

from pyvlm.entrypoints import core_channel
from pyvlm.entrypoints.core_messages import (Abort, Add, Call, Closed, Outputs, Reply,
                                             StartFailed, Stop, output_from_row)
from pyvlm.entrypoints.engine_core import log_marker, run_engine_core
from pyvlm.entrypoints.step_loop import SHUT_DOWN, Sink, StepClock, send_to_sink
from pyvlm.scheduling.errors import EngineDeadError, RequestFailedError
from pyvlm.scheduling.request import Request

logger = logging.getLogger("pyvlm.engine")

KILL_WAIT_S = 5.0  # after SIGKILL, how long reaping may take


class CoreClient:
    """Starts and drives an engine process (see the module docstring).
    CoreClient(spec) starts it; wait_ready() waits until its core is built
    (raising what stopped it), after which it serves."""

    def __init__(self, spec):
        raise_open_file_limit()
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._conn, child_conn = context.Pipe()
        self.clock = StepClock(context.RawValue("d", math.nan))
        self.failure: Optional[str] = None
        self.pid: Optional[int] = None
        self._reap_lock = threading.Lock()  # one thread at a time reaps (_has_exited)
        self._process = context.Process(
            target=run_engine_core, args=(spec, child_conn, self.clock.cell, _log_settings()),
            name="pyvlm-engine", daemon=True)
        self._process.start()
        child_conn.close()  # only the child holds its end: its exit closes the connection
        marker = log_marker(spec)  # "[DP i]" for a data-parallel replica's client
        self._log_prefix = f"{marker} " if marker else ""
        self._sinks: Dict[str, Sink] = {}
        self._calls: Dict[int, "queue.Queue"] = {}
        self._call_ids = itertools.count()
        self._lock = threading.Lock()  # orders submissions against closing
        self._outgoing: "queue.SimpleQueue" = queue.SimpleQueue()  # messages for the sender
        self._closed = False
        self._stop_requested = False
        self._reader: Optional[threading.Thread] = None
        self._sender: Optional[threading.Thread] = None

    # ---- start-up ------------------------------------------------------------

    def wait_ready(self) -> None:
        """Waits for the engine process's core (loading weights can take
        minutes); raises its start-up error, or EngineDeadError if it died."""
        message = self._first_message()
        if isinstance(message, StartFailed):
            self.stop()
            raise message.error
        self.pid = message.pid
        logger.info("%sEngine process started (pid %d)", self._log_prefix, self.pid)
        self._reader = threading.Thread(target=self._read, name="pyvlm-engine-reader",
                                        daemon=True)
        self._sender = threading.Thread(target=self._send_queued, name="pyvlm-engine-sender",
                                        daemon=True)
        self._reader.start()
        self._sender.start()

    def _first_message(self):
        """Ready or StartFailed; EngineDeadError if the process ended first."""
        while not self._conn.poll(0.5) and not self._has_exited():
            pass
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._has_exited(KILL_WAIT_S)
            raise EngineDeadError(f"the engine process {_exit_reason(self._exit_code())} "
                                  "while starting (see its log above)") from None

    # ---- the StepLoop interface ----------------------------------------------

    def submit(self, request: Request, sink: Sink) -> None:
        """Queues the request for the sender thread (the caller's thread,
        an event loop's, never waits on the connection)."""
        with self._lock:
            refused = self._closed
            if not refused:
                self._sinks[request.rid] = sink
        if refused:
            send_to_sink(sink, None, self._dead_error())
            return
        self._outgoing.put(Add(request))  # if the process is gone, the reader fails the sink

    def abort(self, rid: str) -> None:
        if not self._closed:
            self._outgoing.put(Abort(rid))

    def command(self, name: str) -> object:
        """Runs the core's command `name` (startup.CORE_COMMANDS) in the
        engine process, between steps; returns its result."""
        done: "queue.Queue" = queue.Queue(maxsize=1)
        call_id = next(self._call_ids)
        with self._lock:
            if self._closed:
                raise self._dead_error()
            self._calls[call_id] = done
        self._outgoing.put(Call(call_id, name))
        ok, value = self.wait(done)
        if not ok:
            raise value
        return value

    def is_alive(self) -> bool:
        return self._reader is not None and not self._closed

    def step_running_for(self) -> Optional[float]:
        """Seconds the engine's current step has run, None between steps
        (read from shared memory: a hung engine process still answers)."""
        return None if self._closed else self.clock.running_for()

    def wait(self, results: "queue.Queue"):
        """results.get(), but raises once the engine process is gone (never hangs)."""
        while True:
            try:
                return results.get(timeout=0.5)
            except queue.Empty:
                if self._closed or not self._reader.is_alive():
                    raise self._dead_error() from None

    def stop(self, timeout: float = 30.0) -> None:
        """Shuts the engine process down (what is in flight fails as shut
        down); kills it if it has not exited within `timeout` seconds."""
        self._stop_requested = True
        if not self._has_exited():
            self._post_last(Stop())
            if not self._has_exited(timeout):
                logger.warning("%sthe engine process did not stop within %.0f s; killing it",
                               self._log_prefix, timeout)
                self._kill()
        self._outgoing.put(None)  # (a sender still running ends after what is queued)
        for thread in (self._sender, self._reader):
            if thread is not None:
                thread.join(KILL_WAIT_S)
        self._conn.close()

    def dump_stacks(self) -> None:
        """Asks the engine process to write its threads' stacks to stderr."""
        if not self._has_exited():
            os.kill(self._process.pid, signal.SIGUSR1)

    # ---- the reader thread ---------------------------------------------------

    def _read(self) -> None:
        try:
            while True:
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            pass
        except BaseException:  # a bug here must not leave callers waiting
            logger.exception("the engine process reader failed")
        finally:
            self._close()

    def _dispatch(self, message) -> None:
        if isinstance(message, Outputs):
            for rid, row, err in message.items:
                self._deliver(rid, None if row is None else output_from_row(row), err)
        elif isinstance(message, Reply):
            done = self._calls.pop(message.call_id, None)
            if done is not None:
                done.put((message.ok, message.value))
        elif isinstance(message, Closed):
            self.failure = message.failure

    def _deliver(self, rid: str, out, err) -> None:
        sink = self._sinks.get(rid)
        if sink is None:
            return
        if err is not None or out.finished:
            self._sinks.pop(rid, None)
        if not send_to_sink(sink, out, err) and err is None and not out.finished:
            # The receiver is gone (e.g. its event loop closed): stop the work.
            self._sinks.pop(rid, None)
            self.abort(rid)

    def _close(self) -> None:
        """The engine process has ended: reap it, say why, fail every
        request and call still waiting, refuse what comes later."""
        if not self._has_exited(KILL_WAIT_S):  # closed its end but did not exit
            self._kill()
        if self.failure is None and not self._stop_requested:
            self.failure = f"the engine process {_exit_reason(self._exit_code())}"
            logger.critical("%sengine stopped: %s", self._log_prefix, self.failure)
        with self._lock:
            self._closed = True
            sinks, self._sinks = self._sinks, {}
            calls, self._calls = self._calls, {}
        error = self._dead_error()
        for sink in sinks.values():
            send_to_sink(sink, None, error)
        for done in calls.values():
            done.put((False, error))

    # ---- the process's end ---------------------------------------------------

    def _has_exited(self, timeout: float = 0.0) -> bool:
        """Whether the engine process has exited, waiting up to timeout
        seconds; an exited process is reaped. The exit is read from the
        process's sentinel, never from waitpid: the reader thread (on EOF)
        and stop() wait for the same exit, and of two threads reaping one
        child the loser's waitpid fails (ECHILD), which multiprocessing's
        join() and is_alive() report as a process still running (stop()
        then logged that it did not stop within its timeout, at once, and
        killed a process that had exited)."""
        if not multiprocessing.connection.wait([self._process.sentinel], timeout):
            return False
        with self._reap_lock:
            self._process.join()  # it has exited: at most a zombie to reap
        return True

    def _exit_code(self) -> Optional[int]:
        with self._reap_lock:  # exitcode may reap (waitpid) too
            return self._process.exitcode

    def _kill(self) -> None:
        """SIGKILL, then reaping (KILL_WAIT_S at most)."""
        with self._reap_lock:
            self._process.kill()
        self._has_exited(KILL_WAIT_S)

    # ---- the sender thread ---------------------------------------------------

    def _send_queued(self) -> None:
        """Sends the queued messages in order until the None after the last.
        A send releases the GIL, and getting it back waited for the
        server's other threads (1.7 ms per request with 64 streams, 2-core
        VM, bench_host_overhead), which stalled the event loop that
        submitted; here only this thread waits."""
        while (message := self._outgoing.get()) is not None:
            packet = self._packed(message)
            if packet is not None:
                self._send(packet)

    def _packed(self, message) -> Optional[core_channel.Packet]:
        """The message's packet; None if it cannot be pickled (a request's
        sink is then failed)."""
        try:
            return core_channel.pack(message)
        except Exception as exc:  # e.g. an image payload that cannot be pickled
            logger.exception("cannot send a %s to the engine process", type(message).__name__)
            if isinstance(message, Add):
                with self._lock:
                    sink = self._sinks.pop(message.request.rid, None)
                if sink is not None:
                    send_to_sink(sink, None, RequestFailedError(
                        f"cannot send the request ({type(exc).__name__})"))
            return None

    def _post_last(self, message) -> None:
        """Sends message after everything queued: through the sender thread
        when it runs (it ends after it), else at once."""
        if self._sender is None:
            self._send(core_channel.pack(message))
            return
        self._outgoing.put(message)
        self._outgoing.put(None)

    def _send(self, packet: core_channel.Packet) -> None:
        try:  # one thread at a time: the sender, or stop() when there is none
            core_channel.send(self._conn, packet)
        except OSError:  # the process is gone: the reader fails what waits
            logger.debug("the engine process is gone; message dropped")

    def _dead_error(self) -> EngineDeadError:
        return EngineDeadError(self.failure or SHUT_DOWN)


def _exit_reason(exitcode: Optional[int]) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def raise_open_file_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by the engine process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:  # RLIM_INFINITY is -1: compare for equality only
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # e.g. an infinite hard limit the kernel caps
        logger.debug("cannot raise the open file limit from %d", soft)


def _log_settings():
    """The root logger's level and, if it has a handler, its format."""
    root = logging.getLogger()
    formatter = root.handlers[0].formatter if root.handlers else None
    return root.getEffectiveLevel(), formatter._fmt if formatter is not None else None
