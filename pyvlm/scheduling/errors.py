"""Errors the engine reports to callers (no torch).

RequestFailedError: one request failed inside the engine (its images, its
prefill, its sampling); only that request ends, the rest keep running.
EngineDeadError: the engine is not running (shut down, or stopped after a
fatal error); every request in flight and every new one gets it.
DeviceFailure: raised by a model runner whose device no longer works (a
CUDA sticky error): the engine stops, since nothing it computes can be
trusted any more, and a supervisor must restart the process.
EngineBusyError: the engine cannot take the request now (its budget for
queued images is full); the caller may retry later.
"""


class RequestFailedError(RuntimeError):
    """One request failed in the engine; the message is safe for clients."""


class EngineDeadError(RuntimeError):
    """The engine is not running; the message says why."""


class DeviceFailure(RuntimeError):
    """The runner's device is unusable; the engine must stop."""


class EngineBusyError(RuntimeError):
    """The engine cannot take this request now (retry later: HTTP 429)."""
