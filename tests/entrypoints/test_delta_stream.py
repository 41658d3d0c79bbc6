"""DeltaStream.next_outputs: the outputs that waited come in one call, in
order, never past the finished one; an error after some outputs is raised
by the call after the one that takes them, as next_output raises it."""

import asyncio
from types import SimpleNamespace

import pytest

from pyvlm.entrypoints.engine import DeltaStream
from pyvlm.scheduling.errors import RequestFailedError
from pyvlm.scheduling.request import Request, RequestOutput


class OneRequestEngine:
    """What DeltaStream needs of an Engine: _submit keeps the sink."""

    def __init__(self):
        self.sink, self.aborted = None, []
        self.step_loop = SimpleNamespace(abort=self.aborted.append)

    def _submit(self, request, sink) -> None:
        self.sink = sink


def output(num: int, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", [num], f"t{num}", finished, "length" if finished else None, None,
                         3, num, 0)


async def stream_with(items):
    """A DeltaStream whose sink got items ((output, error) pairs) before its
    consumer asked (they waited)."""
    engine = OneRequestEngine()
    stream = DeltaStream(engine, Request("r", [1]))
    for out, err in items:
        engine.sink(out, err)
    await asyncio.sleep(0)  # the loop's deliveries run
    return stream, engine


def test_waiting_outputs_come_in_one_call_up_to_the_finished_one():
    async def run():
        stream, engine = await stream_with([(output(1), None), (output(2), None),
                                            (output(3, finished=True), None)])
        batch = await stream.next_outputs()
        with pytest.raises(StopAsyncIteration):
            await stream.next_outputs()
        await stream.aclose()
        return [out.new_text for out in batch], engine.aborted
    assert asyncio.run(run()) == (["t1", "t2", "t3"], [])  # finished: nothing to abort


def test_an_error_after_outputs_is_raised_by_the_next_call():
    async def run():
        stream, _ = await stream_with([(output(1), None), (output(2), None),
                                       (None, RequestFailedError("it failed"))])
        batch = await stream.next_outputs()
        with pytest.raises(RequestFailedError, match="it failed"):
            await stream.next_outputs()
        return [out.new_text for out in batch]
    assert asyncio.run(run()) == ["t1", "t2"]


def test_one_at_a_time_when_the_consumer_keeps_up():
    async def run():
        engine = OneRequestEngine()
        stream = DeltaStream(engine, Request("r", [1]))
        batches = []
        for num in (1, 2):
            waiting = asyncio.ensure_future(stream.next_outputs())
            await asyncio.sleep(0)
            engine.sink(output(num, finished=num == 2), None)
            batches.append([out.new_text for out in await waiting])
        return batches
    assert asyncio.run(run()) == [["t1"], ["t2"]]
