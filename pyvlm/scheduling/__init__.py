"""Scheduling core: requests, page and radix-cache bookkeeping, the
continuous-batching scheduler and incremental detokenization. No torch."""

from pyvlm.scheduling.detokenizer import IncrementalDetokenizer, detokenizer_factory
from pyvlm.scheduling.request import Request, RequestOutput, RequestStatus
from pyvlm.scheduling.scheduler import Scheduler

__all__ = ["IncrementalDetokenizer", "Request", "RequestOutput", "RequestStatus", "Scheduler",
           "detokenizer_factory"]
