"""The model runner of a tensor-parallel engine (SGLang's TP workers, with
its broadcast_pyobj pattern): rank 0, the engine process, schedules; every
rank runs every step.

Rank 0's scheduler drives a TensorParallelRunner, which has the
ModelRunner interface: each call that runs the model (launch, forward,
token_logits) or changes a runner's state (free_encoder_cache) first
broadcasts itself, pickled (its batch less what no rank reads:
lean_batches), to the other ranks over a gloo group
(torch.distributed.broadcast_object_list), then runs on rank 0's own
runner. The workers (serve_steps) receive each message and make the same
call on their runners, in the same order, so the collectives inside the
model (all-reduce, all-gather) meet. Every rank gets the same batch (seeds
included) and the same gathered logits, so every rank samples the same
tokens and keeps the same FUTURE_TOKEN state: overlap scheduling needs no
extra message (a worker's launch(N + 1) reads the tokens of its own
launch(N), as rank 0's does).

A step that raises on rank 0 (a bad request) raises the same way on every
rank (same inputs): a worker logs it and goes on, while rank 0's scheduler
isolates the request (its reruns, one chunk at a time, are broadcast too).
A failure of the broadcast itself means a rank is gone: DeviceFailure, the
engine stops. So may a step's failure: a collective inside the model fails
when a rank on another node died (no watcher of rank 0 sees its process),
so after any failed call rank 0 checks that every rank still answers (a
round trip, CheckRanks) and raises DeviceFailure if not, the error as it
is if so (a bad request).

Idle workers wait in a broadcast whose timeout bounds every wait (nothing
hangs for half an hour): rank 0 sends a Heartbeat when no step went out
for HEARTBEAT_S, so an idle engine never times its workers out.
"""

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from pyvlm.entrypoints.lean_batches import lean_batch
from pyvlm.scheduling.errors import DeviceFailure
from pyvlm.scheduling.types import ForwardBatch, SampleResult

logger = logging.getLogger("pyvlm.engine")

HEARTBEAT_S = 30.0  # well under the object group's timeout (tensor_parallel_ranks)
DEATH_NOTICE_S = 2.0  # a dead rank's sentinel fires at once; its peers' errors may come first


# ---- rank 0 -> workers -------------------------------------------------------

@dataclass(frozen=True)
class RunStep:
    """runner.launch(batch), waited for later (results dropped: rank 0
    reads its own; WorkerSteps)."""

    batch: ForwardBatch


@dataclass(frozen=True)
class RunTokenLogits:
    """runner.token_logits(batch) (its KV goes into the pool, as a step's)."""

    batch: ForwardBatch


@dataclass(frozen=True)
class FreeEncoderCache:
    """runner.free_encoder_cache() (flush_cache)."""


@dataclass(frozen=True)
class Heartbeat:
    """Nothing to run: keeps an idle worker's wait under its timeout."""


@dataclass(frozen=True)
class CheckRanks:
    """Answer (a barrier on the object group): does every rank still run?"""


@dataclass(frozen=True)
class StopRanks:
    """Leave the loop (the engine is shutting down)."""


def answer_check(group) -> None:
    """The round trip of CheckRanks: every rank meets in a barrier."""
    import torch.distributed as dist

    dist.barrier(group=group)


def broadcast_message(message: Any, group) -> Any:
    """The message rank 0 broadcasts over `group` (a gloo group): rank 0
    passes it, the others pass None and get it."""
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class TensorParallelRunner:
    """Rank 0's runner: mirrors each call to the other ranks, then makes it
    on `local` (its own ModelRunner); see the module docstring. Attributes
    the scheduler and start-up read (page_size, num_pages, model, ...) are
    the local runner's, the same on every rank. ranks: the
    tensor_parallel_ranks.TensorParallelRanks whose workers it drives;
    shutdown() stops them."""

    def __init__(self, local, ranks):
        self.local, self.ranks = local, ranks
        self._group = ranks.groups.objects
        self._lock = threading.Lock()  # one broadcast at a time: the step thread, heartbeats
        self._last_sent = time.monotonic()
        self._stopped = threading.Event()
        self._heartbeats = threading.Thread(target=self._send_heartbeats,
                                            name="pyvlm-tp-heartbeat", daemon=True)
        self._heartbeats.start()

    def __getattr__(self, name: str):
        # Only reached for what this class lacks: the local runner's state.
        return getattr(self.__dict__["local"], name)

    def launch(self, batch: ForwardBatch):
        self._send(RunStep(lean_batch(batch)))
        return CheckedStep(self._checked(self.local.launch, batch), self)

    def forward(self, batch: ForwardBatch) -> List[Optional[SampleResult]]:
        return self.launch(batch).wait()

    def token_logits(self, batch: ForwardBatch):
        self._send(RunTokenLogits(lean_batch(batch)))
        return self._checked(self.local.token_logits, batch)

    def free_encoder_cache(self) -> None:
        self._send(FreeEncoderCache())
        self.local.free_encoder_cache()

    def shutdown(self, graceful: bool = True) -> None:
        """Stops the heartbeats and the worker ranks: asked to leave when
        graceful (no step runs any more), else killed; every worker is
        reaped and the process groups destroyed."""
        self._stopped.set()
        self._heartbeats.join(5.0)  # (one blocked in a broadcast holds the lock: _send waits)
        self.ranks.stop((lambda: self._send(StopRanks())) if graceful else None)

    def _checked(self, call: Callable, *args):
        """call(*args); an error it raises becomes a DeviceFailure if a rank
        no longer answers (module docstring), else is raised as it is."""
        try:
            return call(*args)
        except DeviceFailure:
            raise
        except Exception:
            self._send(CheckRanks(), round_trip=True)
            raise

    def _send(self, message, round_trip: bool = False) -> None:
        with self._lock:
            try:
                broadcast_message(message, self._group)
                if round_trip:
                    answer_check(self._group)
            except Exception as exc:  # a rank is gone or stuck: none can step any more
                death = self.ranks.death(DEATH_NOTICE_S)
                raise DeviceFailure(death or f"a tensor-parallel rank stopped answering "
                                    f"({type(exc).__name__}: {str(exc)[:300]})") from exc
            self._last_sent = time.monotonic()

    def _send_heartbeats(self) -> None:
        while not self._stopped.wait(HEARTBEAT_S / 4):
            if time.monotonic() - self._last_sent < HEARTBEAT_S:
                continue
            try:
                self._send(Heartbeat())
            except DeviceFailure:
                return  # the engine learns it from its next step, or the rank watcher


def serve_steps(runner, object_group, rank: int) -> None:
    """A worker rank's loop: makes each call rank 0 broadcasts on `runner`
    until StopRanks. A step's error is rank 0's too (same inputs): logged,
    and the loop goes on. Raises when the broadcast fails (rank 0 gone) or
    the device failed."""
    steps = WorkerSteps(runner)
    handlers: Dict[type, Callable[[Any], None]] = {
        RunStep: lambda m: steps.launch(m.batch),
        RunTokenLogits: lambda m: runner.token_logits(m.batch),
        FreeEncoderCache: lambda m: runner.free_encoder_cache(),
        Heartbeat: lambda m: steps.wait(),
        CheckRanks: lambda m: answer_check(object_group),
    }
    while not isinstance(message := broadcast_message(None, object_group), StopRanks):
        try:
            handlers[type(message)](message)
        except DeviceFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - rank 0 raised it too and isolates the request
            logger.warning("tensor-parallel rank %d: a step failed as on rank 0 (%s: %s)",
                           rank, type(exc).__name__, exc)
    steps.wait()


class CheckedStep:
    """Rank 0's launched step: wait() as the local one's, its error checked
    like any call's (TensorParallelRunner._checked)."""

    def __init__(self, step, runner: TensorParallelRunner):
        self._step, self._runner = step, runner

    def wait(self) -> List[Optional[SampleResult]]:
        return self._runner._checked(self._step.wait)


class WorkerSteps:
    """A worker's launched steps, each waited for (its results dropped)
    once the next one is launched: on a GPU the next step is queued while
    one runs, as rank 0's overlap scheduling does, so the worker's host
    work never leaves its GPU idle while rank 0's waits in a collective."""

    def __init__(self, runner):
        self.runner = runner
        self._in_flight = None

    def launch(self, batch: ForwardBatch) -> None:
        launched = self.runner.launch(batch)
        self.wait()
        self._in_flight = launched

    def wait(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.wait()
