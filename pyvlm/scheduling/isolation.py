"""Running a batch so that a failure stays with the request that caused it.

A model step runs many requests at once; when it raises, the batch is run
again one chunk at a time, so the requests that fail alone are failed and
every other one gets its result (re-running a chunk rewrites the same KV
into the same slots and draws the same seeded sample, so nothing changes
for them). A DeviceFailure is not retried: the device is gone for all.
"""

import logging
from dataclasses import dataclass
from typing import List, Optional, Union

from pyvlm.scheduling.errors import DeviceFailure
from pyvlm.scheduling.types import ForwardBatch, ModelRunner, SampleResult, SequenceChunk

logger = logging.getLogger("pyvlm.engine")


@dataclass(frozen=True)
class ChunkFailure:
    """The error a chunk raised when run on its own."""

    error: BaseException

    @property
    def message(self) -> str:
        """One line for the client: the error's type, never a traceback."""
        return f"the engine failed on this request ({type(self.error).__name__})"


ChunkResult = Union[SampleResult, None, ChunkFailure]


def forward_isolated(runner: ModelRunner, batch: ForwardBatch) -> List[ChunkResult]:
    """runner.forward(batch), or per chunk its result or its ChunkFailure."""
    try:
        return runner.forward(batch)
    except DeviceFailure:
        raise
    except Exception as exc:
        if len(batch.chunks) == 1:
            return [_failed(batch.chunks[0], exc)]
        logger.warning("a batch of %d requests failed (%s: %s); running them one by one",
                       len(batch.chunks), type(exc).__name__, exc)
        return [_forward_alone(runner, batch.is_decode, chunk) for chunk in batch.chunks]


def _forward_alone(runner: ModelRunner, is_decode: bool, chunk: SequenceChunk) -> ChunkResult:
    try:
        return runner.forward(ForwardBatch(is_decode, [chunk]))[0]
    except DeviceFailure:
        raise
    except Exception as exc:
        return _failed(chunk, exc)


def _failed(chunk: SequenceChunk, exc: BaseException) -> ChunkFailure:
    logger.error("request %s failed in the engine", chunk.rid, exc_info=exc)
    return ChunkFailure(exc)


def is_failure(result: Optional[ChunkResult]) -> bool:
    return isinstance(result, ChunkFailure)
