"""Property tests of the parser: arbitrary input gives only events or a
ProtocolError, and requests serialised by the standard library's
http.client parse back to what was sent, however the bytes are split."""

import http.client

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvlm.http.errors import ProtocolError
from pyvlm.http.parser import (
    NEED_DATA,
    BodyData,
    ConnectionClosed,
    EndOfRequest,
    ParserLimits,
    RequestHead,
    RequestParser,
)

EVENT_TYPES = (RequestHead, BodyData, EndOfRequest, ConnectionClosed)
SMALL = ParserLimits(max_header_bytes=512, max_header_count=8, max_body_bytes=256)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def split(data: bytes, cuts):
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
    return [piece for piece in pieces if piece]  # b"" would mean EOF


def events_or_protocol_error(pieces, limits):
    """Feed `pieces` then EOF; return the events, or the ProtocolError."""
    parser, events = RequestParser(limits), []
    try:
        for piece in list(pieces) + [b""]:
            parser.receive_data(piece)
            while (event := parser.next_event()) is not NEED_DATA:
                assert isinstance(event, EVENT_TYPES)
                events.append(event)
                if isinstance(event, ConnectionClosed):
                    return events
    except ProtocolError as error:
        assert error.status in (400, 408, 413, 417, 431, 501, 505)
        return error
    raise AssertionError("EOF must end in ConnectionClosed or a ProtocolError")


@FAST
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_arbitrary_bytes_give_events_or_a_protocol_error(data, cuts):
    events_or_protocol_error(split(data, cuts), SMALL)


HTTPISH = [
    b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\n", b"GET / HTTP/1.0\r\n", b"GET / HTTP/2.0\r\n",
    b"Host: a\r\n", b"Content-Length: 3\r\n", b"Content-Length: 999\r\n", b"Content-Length: x\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n", b"Expect: 100-continue\r\n",
    b"Connection: close\r\n", b"\r\n", b"\n", b"\r", b"3\r\n", b"0\r\n", b"ff\r\n", b"abc", b" ", b":", b"\t",
]  # fmt: skip


@FAST
@given(st.lists(st.sampled_from(HTTPISH) | st.binary(max_size=8), max_size=30), st.lists(st.integers(0, 400)))
def test_http_like_soup_gives_events_or_a_protocol_error(tokens, cuts):
    data = b"".join(tokens)
    whole = events_or_protocol_error([data], SMALL)
    pieces = events_or_protocol_error(split(data, cuts), SMALL)
    if isinstance(whole, ProtocolError):
        assert isinstance(pieces, ProtocolError) and pieces.status == whole.status
    else:
        assert _merge(pieces) == _merge(whole)


class CapturingSocket:
    def __init__(self):
        self.sent = bytearray()

    def sendall(self, data):
        self.sent += data


def stdlib_request(method, path, headers, body, is_chunked) -> bytes:
    """The bytes http.client sends for this request (the reference)."""
    connection = http.client.HTTPConnection("example.test")
    connection.sock = CapturingSocket()
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
    connection.request(method, path, body=iter(pieces) if is_chunked else body, headers=headers, encode_chunked=is_chunked)
    return bytes(connection.sock.sent)


header_names = st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True)
header_values = st.from_regex(r"[!-~]([ -~]{0,20}[!-~])?", fullmatch=True)
request_specs = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    st.from_regex(r"/[A-Za-z0-9/_.%-]{0,20}(\?[A-Za-z0-9=&]{0,10})?", fullmatch=True),
    st.dictionaries(header_names, header_values, max_size=5),
    st.binary(max_size=200),
    st.booleans(),
)


@FAST
@given(st.lists(request_specs, min_size=1, max_size=3), st.lists(st.integers(0, 2000), max_size=12))
def test_stdlib_requests_round_trip(specs, cuts):
    raw = b"".join(stdlib_request(*spec) for spec in specs)
    events = events_or_protocol_error(split(raw, cuts), ParserLimits())
    assert not isinstance(events, ProtocolError), events
    requests = _group(_merge(events))
    assert len(requests) == len(specs)
    for (head, body), (method, path, headers, sent_body, is_chunked) in zip(requests, specs):
        assert (head.method, head.target, head.is_chunked) == (method, path, is_chunked)
        assert body == sent_body
        for name, value in headers.items():
            assert (name.lower(), value) in head.headers


def _merge(events):
    merged = []
    for event in events:
        if isinstance(event, BodyData) and merged and isinstance(merged[-1], BodyData):
            merged[-1] = BodyData(merged[-1].data + event.data)
        elif not (isinstance(event, BodyData) and not event.data):
            merged.append(event)
    return merged


def _group(events):
    """[(RequestHead, body bytes)] from merged events."""
    requests, head, body = [], None, b""
    for event in events:
        if isinstance(event, RequestHead):
            head, body = event, b""
        elif isinstance(event, BodyData):
            body = event.data
        elif isinstance(event, EndOfRequest):
            requests.append((head, body))
    return requests
