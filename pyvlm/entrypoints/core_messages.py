"""The messages between the caller's process (CoreClient) and the engine
process (engine_core), as plain dataclasses pickled over one
multiprocessing connection.

The caller's messages go through core_channel: tensors inside them (the
pixel tensors of a Request's images) do not travel as pickled bytes but
in shared memory (an unlinked file, whose descriptor is passed with the
message; nothing is left in /dev/shm when either process dies), so a
message carries only handles. The engine's messages hold no tensors:
`encode` pickles them plainly.
"""

import dataclasses
import operator
import pickle
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import torch

from pyvlm.scheduling.errors import (EngineBusyError, EngineDeadError, RequestFailedError)
from pyvlm.scheduling.request import Request, RequestOutput


# ---- caller -> engine process ----------------------------------------------

@dataclass(frozen=True)
class Add:
    request: Request


@dataclass(frozen=True)
class Abort:
    rid: str


@dataclass(frozen=True)
class Call:
    """Runs the core's command `name` (startup.CORE_COMMANDS) between steps."""

    call_id: int
    name: str


@dataclass(frozen=True)
class Stop:
    """Fail what is in flight (the engine was shut down) and exit."""


# ---- engine process -> caller ----------------------------------------------

@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class StartFailed:
    error: BaseException


@dataclass(frozen=True)
class Outputs:
    """One step's outputs: (rid, output row, None) or (rid, None, error); a
    request's last entry is a finished output or an error. An output
    travels as its row (output_row): a tuple of plain values pickles and
    unpickles in C, several times faster than the dataclass (a full decode
    step sends one per running request)."""

    items: List[Tuple[str, Optional[tuple], Optional[BaseException]]]


@dataclass(frozen=True)
class Reply:
    call_id: int
    ok: bool
    value: Any  # the command's result, or the error it raised


@dataclass(frozen=True)
class Closed:
    """The step loop ended; failure says why when it was not a Stop."""

    failure: Optional[str]


_OUTPUT_FIELDS = tuple(field.name for field in dataclasses.fields(RequestOutput))
# output_row(out): a RequestOutput's fields as a tuple, in declaration order
# (an attrgetter: built in C).
output_row = operator.attrgetter(*_OUTPUT_FIELDS)


def output_from_row(row: tuple) -> RequestOutput:
    """The RequestOutput whose output_row is row."""
    return RequestOutput(*row)


def encode(message) -> bytes:
    """The bytes of an engine message for Connection.send_bytes (the other
    end's Connection.recv reads it). It holds no tensor, so it needs no
    ForkingPickler, whose set-up per message cost more than pickling a
    step's outputs."""
    return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)


def move_to_shared_memory(request: Request) -> None:
    """Moves the tensors of the request's prepared images into shared memory
    (one copy each), where the request is built (a builder thread), so that
    sending it later passes handles only and never copies pixels on the
    caller's event loop."""
    for item in request.mm_items:
        for tensor in _tensors_in(item.prepared):
            tensor.share_memory_()


def _tensors_in(value) -> Iterator[torch.Tensor]:
    """The CPU tensors of a family's prepared payload (a tensor, or
    dataclasses, lists and tuples holding them)."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu":
            yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _tensors_in(getattr(value, field.name))
    elif isinstance(value, (list, tuple)):
        for element in value:
            yield from _tensors_in(element)


# Errors a caller tells apart (pyvlm/server/generation.py maps them to statuses).
_KNOWN_ERRORS = (ValueError, EngineDeadError, EngineBusyError, RequestFailedError)


def portable_error(exc: BaseException) -> BaseException:
    """exc if it survives pickling; else its best-known base class with its
    message (a ValueError subclass stays a ValueError: a 400, not a 500)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        pass
    for cls in _KNOWN_ERRORS:
        if isinstance(exc, cls):
            return cls(str(exc))
    return RuntimeError(f"{type(exc).__name__}: {exc}")
