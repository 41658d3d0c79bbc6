"""The streaming hot path against the generic one it replaced:
ChoiceDeltas built from the engine's RequestOutputs (taken in batches of
any size) equal those built from the engine's SGLang-style delta dicts, and a text-only chunk from a
template equals sse_json of the chunk object, byte for byte."""

import asyncio
from typing import List

from hypothesis import given, settings, strategies as st

from pyvlm.entrypoints.outputs import OutputAccumulator
from pyvlm.http.sse import sse_json
from pyvlm.scheduling.request import Request, RequestOutput
from pyvlm.server import responses
from pyvlm.server.errors import ApiError
from pyvlm.server.generation import ChoiceDelta, ChoiceDeltas, Timing


def reference_delta(delta: dict, index: int) -> ChoiceDelta:
    """A ChoiceDelta as made from Engine.async_stream's dicts before
    ChoiceDeltas read RequestOutputs (generation._choice_delta then)."""
    meta = delta["meta_info"]
    finish = meta["finish_reason"]["type"] if delta["finished"] else None
    chosen = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or []
    logprobs = [(int(tid), float(lp), [(int(t), float(v)) for t, v in top])
                for (lp, tid), top in zip(chosen, tops)]
    return ChoiceDelta(index, delta["text"], delta["token_ids"], logprobs, finish, meta)


class ScriptedStream:
    """An Engine.async_stream whose outputs are given, taken batch_sizes[i]
    at a time by the i-th next_outputs (1 when not given), as outputs that
    waited for a late consumer are."""

    def __init__(self, rid: str, outputs, batch_sizes=()):
        self.rid, self._outputs, self.closed = rid, list(outputs), False
        self._batch_sizes = list(batch_sizes)

    async def next_outputs(self) -> List[RequestOutput]:
        if not self._outputs:
            raise StopAsyncIteration
        size = self._batch_sizes.pop(0) if self._batch_sizes else 1
        batch, self._outputs = self._outputs[:size], self._outputs[size:]
        return batch

    async def aclose(self) -> None:
        self.closed = True


def outputs_of(draw_logprobs, num: int, finish: str):
    outputs, text = [], ""
    for i in range(num):
        last = i == num - 1
        logprobs = [(7 + i, -0.5 - i, ((7 + i, -0.5 - i), (3, -2.0)))] if draw_logprobs[i] else []
        outputs.append(RequestOutput("r", [7 + i] if i % 3 else [], f"t{i}" * (i % 2), last,
                                     finish if last else None, "\n" if last else None, 11, i + 1,
                                     4, logprobs))
        text += outputs[-1].new_text
    return outputs


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_choice_deltas_equal_the_dict_paths(data):
    num = data.draw(st.integers(1, 6))
    with_logprobs = data.draw(st.lists(st.booleans(), min_size=num, max_size=num))
    outputs = outputs_of(with_logprobs, num, data.draw(st.sampled_from(["stop", "length"])))
    batch_sizes = data.draw(st.lists(st.integers(1, 4), max_size=num))
    accumulator = OutputAccumulator(Request("r", [1]))
    expected = [reference_delta(accumulator.delta(out), 2) for out in outputs]

    async def collect():
        stream, timing = ScriptedStream("r", outputs, batch_sizes), Timing()
        deltas = [delta async for batch in ChoiceDeltas(stream, 2, timing) for delta in batch]
        assert stream.closed and timing.end is not None
        return deltas

    deltas = asyncio.run(collect())
    assert deltas == expected
    assert [d.meta for d in deltas] == [d.meta for d in expected]  # (meta is made when read)


def test_an_aborted_choice_raises_the_same_error_and_closes():
    out = RequestOutput("r", [], "", True, "abort", None, 3, 0, 0)

    async def run():
        stream = ScriptedStream("r", [out])
        try:
            await ChoiceDeltas(stream, 0).__anext__()
        except ApiError as exc:
            return exc.status, stream.closed
    assert asyncio.run(run()) == (503, True)


def test_text_before_an_abort_in_one_batch_comes_out_before_the_error():
    text = RequestOutput("r", [5], "hi", False, None, None, 3, 1, 0)
    abort = RequestOutput("r", [], "", True, "abort", None, 3, 1, 0)

    async def run():
        stream = ScriptedStream("r", [text, abort], [2])
        deltas = ChoiceDeltas(stream, 0)
        [first] = await deltas.__anext__()
        try:
            await deltas.__anext__()
        except ApiError as exc:
            return first.text, exc.status, stream.closed
    assert asyncio.run(run()) == ("hi", 503, True)


texts = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", "\n\r\t\"\\", "\u2028\u2029", "\x00\x1f\x7f", "日本😀", "</script>"])


@settings(max_examples=200, deadline=None)
@given(text=texts, index=st.integers(0, 3), with_usage=st.booleans(), model=texts)
def test_text_events_equal_the_chunk_objects_sse(text, index, with_usage, model):
    ids = responses.ResponseIds("chatcmpl", model)
    chat = responses.TextEvents(lambda i, t: responses.chat_chunk(
        ids, i, {"content": t}, include_usage=with_usage))
    completion = responses.TextEvents(lambda i, t: responses.completion_text_chunk(
        ids, i, t, None, None, with_usage))
    for _ in range(2):  # the template is made once, then reused
        assert chat.event(index, text) == sse_json(responses.chat_chunk(
            ids, index, {"content": text}, include_usage=with_usage))
        assert completion.event(index, text) == sse_json(responses.completion_chunk(
            ids, ChoiceDelta(index, text, [], [], None, {}), None, with_usage))


def test_a_header_holding_the_text_slot_falls_back_to_the_chunk_object():
    ids = responses.ResponseIds("chatcmpl", responses._TEXT_SLOT)  # (no model is named so)
    chat = responses.TextEvents(lambda i, t: responses.chat_chunk(ids, i, {"content": t}))
    assert chat.event(0, "hi") == sse_json(responses.chat_chunk(ids, 0, {"content": "hi"}))
