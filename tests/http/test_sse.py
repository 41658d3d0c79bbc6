"""SSE framing, read back with the WHATWG event-stream interpretation."""

import json
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pyvlm.http.sse import SSE_DONE, sse_comment, sse_event, sse_json


def parse_event_stream(stream: bytes):
    """[(event type, data)] as a browser's EventSource dispatches them
    (HTML spec, "Interpreting an event stream"; no id/retry handling)."""
    events, data_lines, event_type = [], [], ""
    for line in re.split(r"\r\n|\r|\n", stream.decode("utf-8"))[:-1]:
        if line == "":
            if data_lines:
                events.append((event_type or "message", "\n".join(data_lines)))
            data_lines, event_type = [], ""
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data_lines.append(value)
        elif name == "event":
            event_type = value
    return events


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=40), st.none() | st.from_regex(r"[a-z_]{1,10}", fullmatch=True)), max_size=5))
def test_events_round_trip(events):
    stream = b"".join(sse_event(data, event) for data, event in events) + sse_comment("ping") + SSE_DONE
    expected = [(event or "message", re.sub(r"\r\n|\r", "\n", data)) for data, event in events]
    assert parse_event_stream(stream) == expected + [("message", "[DONE]")]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(json_values, st.none() | st.just("error")), max_size=5))
@example([({"text": "a\r\nb\nc\r"}, None), (["\n"], "error")])
def test_json_events_round_trip(events):
    """Strings holding line breaks too: the data of each event is one line."""
    stream = b"".join(sse_json(obj, event) for obj, event in events)
    parsed = parse_event_stream(stream)
    assert [(name, json.loads(data)) for name, data in parsed] == [
        (event or "message", obj) for obj, event in events]


def test_exact_bytes_of_a_json_chunk_and_done():
    assert sse_event(b'{"a": 1}') == b'data: {"a": 1}\n\n'
    assert sse_json({"a": "x\ny"}) == b'data: {"a":"x\\ny"}\n\n'
    assert sse_json({"a": 1}, event="error") == b'event: error\ndata: {"a":1}\n\n'
    assert sse_event("x", event="error") == b"event: error\ndata: x\n\n"
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_line_breaks_in_names_are_refused():
    with pytest.raises(ValueError):
        sse_event("x", event="a\nb")
    with pytest.raises(ValueError):
        sse_json({}, event="a\r\nb")
    with pytest.raises(ValueError):
        sse_comment("a\rb")
