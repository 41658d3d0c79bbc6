"""The engine process (vLLM V1's EngineCore, SGLang's scheduler process):
the scheduler and the model runner in a process of their own, started with
the spawn method (CUDA-safe) by a CoreClient in the caller's process, which
keeps the HTTP front, the chat template, tokenization and image
preprocessing.

Inside, the usual StepLoop runs the steps on its thread; this process's
main thread reads the caller's messages (pyvlm/entrypoints/core_messages.py)
and hands them to the loop. The loop's sinks put outputs in an Outbox,
which the loop flushes once per step: one message per step, whatever the
batch size, each output a row of plain values (core_messages.Outputs).
Step start times go to a float shared with the caller (the server's
watchdog reads it without asking this process). Once built, the process
freezes its start-up heap out of the cycle collector's way (pyvlm/heap.py).

Detokenization stays here, in the scheduler: stop strings are matched on
the decoded text, and the step that produces a stop string must finish the
request (free its pages, stop sampling it, report "stop") in that same
step. Detokenizing in the caller's process would let a stopped request run
on for a round trip, and would split one request's ending between two
processes. The incremental detokenizer is cheap (a window of a few tokens
per new token) and sends only text deltas back.

Ends: a Stop message (the loop fails what is left as shut down), the
caller's end of the connection closing (the caller died: stop and exit
within seconds, even if a step hangs), or a fatal device error (the loop's
failure is reported, then the process exits). Ctrl-C at a terminal reaches
the whole process group: SIGINT is ignored here, the caller's process
decides when to stop. SIGUSR1 writes every thread's stack to stderr (the
server's watchdog asks for it before exiting on a hung step).

With tensor parallelism (tp_size > 1) this process is rank 0: it starts
this node's other ranks' processes (other nodes start theirs: --node-rank)
and drives them all through its runner
(pyvlm/entrypoints/tensor_parallel_ranks.py). A Stop stops them first; a
rank that dies ends this process with status 1, after a Closed naming the
rank, so the caller's requests fail with EngineDeadError saying which.
"""

import faulthandler
import logging
import os
import signal
import sys
import threading
from typing import Callable, List, Optional, Tuple

from pyvlm.entrypoints import core_channel
from pyvlm.entrypoints.core_messages import (Abort, Add, Call, Closed, Outputs, Ready, Reply,
                                             StartFailed, Stop, encode, output_row,
                                             portable_error)
from pyvlm.heap import tune_for_serving

logger = logging.getLogger("pyvlm.engine")

LogSettings = Tuple[int, Optional[str]]  # the caller's root log level and format
POLL_S = 0.25  # how often the main thread checks that the step loop still runs
PARENT_GONE_STOP_S = 5.0  # a hung step cannot delay the exit longer than this


class Sender:
    """Sends messages to the caller from any thread; a caller that is gone
    is not an error here (the main thread sees the connection close)."""

    def __init__(self, conn):
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message) -> None:
        payload = encode(message)
        try:
            with self._lock:
                self.conn.send_bytes(payload)
        except OSError:
            logger.debug("the caller's process is gone; dropping a message")


class Outbox:
    """Outputs the loop's sinks produced since the last flush."""

    def __init__(self, sender: Sender):
        self.sender = sender
        self._items: List[tuple] = []
        self._lock = threading.Lock()

    def sink_for(self, rid: str) -> Callable:
        def sink(out, err) -> None:
            item = ((rid, output_row(out), None) if err is None else
                    (rid, None, portable_error(err)))
            with self._lock:
                self._items.append(item)
        return sink

    def flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        if items:
            self.sender.send(Outputs(items))


class CallReply:
    """The `done` of StepLoop.call_async: sends the command's result back."""

    def __init__(self, sender: Sender, call_id: int):
        self.sender, self.call_id = sender, call_id

    def put(self, result) -> None:
        ok, value = result
        self.sender.send(Reply(self.call_id, ok, value if ok else portable_error(value)))


def run_engine_core(spec, conn, clock_cell, log_settings: LogSettings) -> None:
    """The engine process's entry point: builds the core from spec (a
    startup.CoreSpec), says Ready (or StartFailed), then serves conn until
    the end (module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    configure_logging(log_settings,
                      log_marker(spec, 0 if spec.config.parallel.tp_size > 1 else None))
    from pyvlm.entrypoints.startup import CORE_COMMANDS, start_core
    from pyvlm.entrypoints.step_loop import StepClock, StepLoop

    sender = Sender(conn)
    try:
        core = start_core(spec, log_settings=log_settings)
    except BaseException as exc:  # the caller raises it from its Engine(...)
        logger.debug("the engine core could not start", exc_info=True)
        sender.send(StartFailed(portable_error(exc)))
        return
    outbox = Outbox(sender)
    tune_for_serving()  # (the process ends with os._exit: nothing to restore)
    loop = StepLoop(core.scheduler, core.runner, StepClock(clock_cell), outbox.flush)
    sender.send(Ready(os.getpid()))
    _end_with_ranks(core.runner, sender)
    commands = {name: getattr(core, name) for name in CORE_COMMANDS}
    caller_stays = _serve(conn, loop, outbox, sender, commands)
    _stop_ranks(core.runner, loop)
    if caller_stays:
        sender.send(Closed(loop.failure))
    # Closed is sent (synchronously) or the caller is gone: nothing is left
    # to do that the interpreter's teardown would add. On CUDA the process
    # outlived the caller's 30 s stop timeout after a Stop (H100 runs of
    # 8e5136e and 22ae614); that teardown (allocators, graphs, library
    # threads) is the suspect, and it is skipped here.
    _exit_now()


def _serve(conn, loop, outbox: Outbox, sender: Sender, commands) -> bool:
    """Hands the caller's messages to the loop while it runs; False when
    the caller's process went away."""
    while loop.is_alive():
        if not conn.poll(POLL_S):
            continue
        try:
            message = core_channel.receive(conn)
        except (EOFError, OSError):
            loop.stop(PARENT_GONE_STOP_S)
            return False
        if isinstance(message, Add):
            loop.submit(message.request, outbox.sink_for(message.request.rid))
        elif isinstance(message, Abort):
            loop.abort(message.rid)
        elif isinstance(message, Call):
            _call(loop, commands.get(message.name), CallReply(sender, message.call_id))
        elif isinstance(message, Stop):
            # Not waiting here: this thread must go on reading, or a caller
            # blocked sending to us (an abort from its reader thread) stops
            # reading our outputs, and the engine thread blocks sending them.
            loop.stop(timeout=0)
    outbox.flush()  # refusals of messages that came after the loop closed
    return True


def _call(loop, command: Optional[Callable], reply: CallReply) -> None:
    if command is None:
        reply.put((False, ValueError("the engine core has no such command")))
    else:
        loop.call_async(command, reply)


def _end_with_ranks(runner, sender: Sender) -> None:
    """With tensor parallelism, a worker rank that dies ends this process
    (status 1), after telling the caller which rank died: its requests then
    fail with EngineDeadError saying so."""
    ranks = getattr(runner, "ranks", None)
    if ranks is None:
        return

    def end(reason: str) -> None:
        sender.send(Closed(reason))
        _exit_now(1)

    ranks.on_death = end


def _stop_ranks(runner, loop) -> None:
    """Stops the tensor-parallel workers, if any: asked to leave once no
    step runs (a step the caller's exit left hanging: killed instead)."""
    shutdown = getattr(runner, "shutdown", None)
    if shutdown is not None:
        shutdown(graceful=not loop.is_alive())


def configure_logging(settings: LogSettings, marker: Optional[str] = None) -> None:
    """This process's logging, like the caller's; with a marker (log_marker:
    which replica and rank this process is), every record's message starts
    with it, whatever handler prints it: replicas and ranks log to the same
    terminal."""
    level, fmt = settings
    if fmt is not None:  # the caller logs to a handler: so does this process, alike
        logging.basicConfig(level=level, format=fmt)
    else:
        logging.getLogger().setLevel(level)
    if marker is not None:
        _mark_log_records(marker)


def log_marker(spec, rank: Optional[int] = None) -> Optional[str]:
    """"[DP i]", "[TP r]" or "[DP i TP r]" for a process of data-parallel
    replica i (spec.replica, replica_spec.ReplicaSpec) and tensor-parallel
    rank r; None for the one engine process of a single-rank engine."""
    parts = []
    replica = getattr(spec, "replica", None)
    if replica is not None:
        parts.append(f"DP {replica}")
    if rank is not None:
        parts.append(f"TP{rank}")
    return f"[{' '.join(parts)}]" if parts else None


def _mark_log_records(marker: str) -> None:
    """Starts every later log record's message of this process with marker."""
    make_record = logging.getLogRecordFactory()

    def marked(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.msg = f"{marker} {record.msg}"
        return record

    logging.setLogRecordFactory(marked)


def _exit_now(status: int = 0) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(status)
