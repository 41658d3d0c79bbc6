"""The sans-IO request parser: every case fed whole and byte by byte."""

import pytest

from pyvlm.http import receive_buffer
from pyvlm.http.errors import ProtocolError
from pyvlm.http.parser import (
    NEED_DATA,
    BodyData,
    ConnectionClosed,
    EndOfRequest,
    ParserLimits,
    RequestHead,
    RequestParser,
    split_target,
)

SMALL = ParserLimits(max_header_bytes=200, max_header_count=5, max_body_bytes=100)


def feed(pieces, limits=ParserLimits(), eof=False):
    """All events from feeding `pieces`, BodyData merged per request."""
    parser, events = RequestParser(limits), []
    for piece in list(pieces) + ([b""] if eof else []):
        parser.receive_data(piece)
        while (event := parser.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return _merge_bodies(events)
    return _merge_bodies(events)


def _merge_bodies(events):
    merged = []
    for event in events:
        if isinstance(event, BodyData) and merged and isinstance(merged[-1], BodyData):
            merged[-1] = BodyData(merged[-1].data + event.data)
        else:
            merged.append(event)
    return merged


def whole_and_bytewise(raw, limits=ParserLimits(), eof=False):
    """Events from `raw` given at once and byte by byte; asserts they agree."""
    whole = feed([raw], limits, eof)
    bytewise = feed([raw[i : i + 1] for i in range(len(raw))], limits, eof)
    assert whole == bytewise
    return whole


def refusal_status(raw, limits=ParserLimits(), eof=False):
    """The status of the ProtocolError `raw` raises, whole and byte by byte."""
    statuses = []
    for pieces in ([raw], [raw[i : i + 1] for i in range(len(raw))]):
        with pytest.raises(ProtocolError) as info:
            feed(pieces, limits, eof)
        statuses.append(info.value.status)
    assert statuses[0] == statuses[1]
    return statuses[0]


def test_get_with_query_and_headers():
    raw = b"GET /v1/models?x=1 HTTP/1.1\r\nHost: a\r\nX-Thing:   spaced value \t\r\nAccept: */*\r\n\r\n"
    head, end = whole_and_bytewise(raw)
    assert (head.method, head.target, head.http_version) == ("GET", "/v1/models?x=1", "1.1")
    assert head.headers == [("host", "a"), ("x-thing", "spaced value"), ("accept", "*/*")]
    assert (head.content_length, head.is_chunked, head.keep_alive, head.expects_continue) == (None, False, True, False)
    assert end == EndOfRequest()


def test_content_length_body():
    body = bytes(range(256)) * 3
    raw = b"POST /generate HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    head, data, end = whole_and_bytewise(raw)
    assert head.content_length == len(body) and data == BodyData(body) and end == EndOfRequest()


def test_chunked_body_with_extensions_and_trailers():
    raw = (
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\nA \r\n, world!!!\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    head, data, end = whole_and_bytewise(raw)
    assert head.is_chunked and head.content_length is None
    assert data == BodyData(b"hello, world!!!") and end == EndOfRequest()


def test_pipelined_requests_keep_their_order_and_bodies():
    requests = [
        b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n",
    ]
    events = whole_and_bytewise(b"".join(requests))
    heads = [event.target for event in events if isinstance(event, RequestHead)]
    bodies = [event.data for event in events if isinstance(event, BodyData)]
    assert heads == ["/a", "/b", "/c"] and bodies == [b"abc", b"xy"]
    assert sum(isinstance(event, EndOfRequest) for event in events) == 3


def test_bare_lf_line_endings_and_leading_blank_lines():
    head, end = whole_and_bytewise(b"\r\n\nGET / HTTP/1.1\nHost: a\n\n")
    assert head.target == "/" and head.headers == [("host", "a")] and end == EndOfRequest()


@pytest.mark.parametrize(
    "version, connection, keep_alive",
    [("1.1", None, True), ("1.1", "close", False), ("1.1", "Keep-Alive, Close", False),
     ("1.0", None, False), ("1.0", "keep-alive", True)],
)  # fmt: skip
def test_keep_alive_rules(version, connection, keep_alive):
    header = b"" if connection is None else b"Connection: %b\r\n" % connection.encode()
    head, _ = whole_and_bytewise(b"GET / HTTP/%b\r\nHost: a\r\n%b\r\n" % (version.encode(), header))
    assert head.keep_alive is keep_alive and head.http_version == version


def test_nothing_is_parsed_after_a_closing_request():
    events = whole_and_bytewise(b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
    assert [type(event) for event in events] == [RequestHead, EndOfRequest]


def test_http10_needs_no_host_and_ignores_expect():
    head, _ = whole_and_bytewise(b"GET / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n")
    assert head.http_version == "1.0" and not head.expects_continue


def test_expect_100_continue():
    head, data, _ = whole_and_bytewise(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\nz")
    assert head.expects_continue and data == BodyData(b"z")


def test_equal_duplicate_content_lengths_are_merged():
    head, data, _ = whole_and_bytewise(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok")
    assert head.content_length == 2 and data == BodyData(b"ok")


def test_absolute_form_target():
    head, _ = whole_and_bytewise(b"GET http://example.com/v1/models?a=b HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert split_target(head.target) == ("/v1/models", "a=b")
    assert split_target("/p%20q?x=1?y") == ("/p%20q", "x=1?y")


def test_eof_between_requests_and_in_the_middle():
    assert whole_and_bytewise(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", eof=True)[-1] == ConnectionClosed()
    assert whole_and_bytewise(b"", eof=True) == [ConnectionClosed()]
    assert refusal_status(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab", eof=True) == 400
    assert refusal_status(b"GET / HTTP/1.1\r\nHo", eof=True) == 400


HEAD = b"POST / HTTP/1.1\r\nHost: a\r\n"
REFUSALS = {
    "both framings": (HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc", 400),
    "both framings, TE first": (HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n", 400),
    "gzip coding": (HEAD + b"Transfer-Encoding: gzip\r\n\r\n", 501),
    "gzip then chunked": (HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
    "chunked not last": (HEAD + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    "chunked twice": (HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    "empty coding": (HEAD + b"Transfer-Encoding: ,chunked\r\n\r\n", 400),
    "TE in HTTP/1.0": (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    "HTTP/2.0": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "HTTP/1.2": (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
    "no version": (b"GET /\r\nHost: a\r\n\r\n", 400),
    "two spaces": (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "lower-case version": (b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    "relative target": (b"GET v1/models HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "missing host": (b"GET / HTTP/1.1\r\nAccept: x\r\n\r\n", 400),
    "two hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "space before colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    "no colon": (b"GET / HTTP/1.1\r\nHost: a\r\nnocolon\r\n\r\n", 400),
    "bare CR in value": (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", 400),
    "NUL in value": (b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n", 400),
    "non-digit length": (HEAD + b"Content-Length: 3a\r\n\r\n", 400),
    "negative length": (HEAD + b"Content-Length: -1\r\n\r\n", 400),
    "plus length": (HEAD + b"Content-Length: +1\r\n\r\n", 400),
    "conflicting lengths": (HEAD + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    "21-digit length": (HEAD + b"Content-Length: 100000000000000000000\r\n\r\n", 400),
    "unknown expectation": (HEAD + b"Expect: 200-ok\r\n\r\n", 417),
    "bad chunk size": (HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    "17-digit chunk size": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n10000000000000000\r\n", 400),
    "chunk without CRLF": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n0\r\n\r\n", 400),
    "bad trailer": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals(name):
    raw, status = REFUSALS[name]
    assert refusal_status(raw) == status


def test_declared_body_over_the_limit_is_413_before_any_body_byte():
    assert refusal_status(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 101\r\n\r\n", SMALL) == 413
    head, _, _ = whole_and_bytewise(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 100, SMALL)
    assert head.content_length == 100


def test_chunked_body_over_the_limit_is_413_at_the_size_line():
    chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert refusal_status(chunked + b"32\r\n" + b"x" * 50 + b"\r\n33\r\n", SMALL) == 413
    events = whole_and_bytewise(chunked + b"32\r\n" + b"x" * 50 + b"\r\n32\r\n" + b"y" * 50 + b"\r\n0\r\n\r\n", SMALL)
    assert events[1] == BodyData(b"x" * 50 + b"y" * 50)


def test_header_section_limits_are_431():
    filler = b"X-Pad: " + b"p" * 180 + b"\r\n"
    assert refusal_status(b"GET / HTTP/1.1\r\nHost: a\r\n" + filler + b"\r\n", SMALL) == 431
    assert refusal_status(b"GET / HTTP/1.1\r\nHost: a\r\n" + filler + filler, SMALL) == 431  # never terminated
    many = b"".join(b"X-%d: v\r\n" % i for i in range(5))
    assert refusal_status(b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n", SMALL) == 431
    assert refusal_status(b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n", SMALL) == 431
    head, _ = whole_and_bytewise(b"GET / HTTP/1.1\r\nHost: a\r\n" + many[: -len(b"X-4: v\r\n")] + b"\r\n", SMALL)
    assert len(head.headers) == 5


def test_trailers_over_the_limit_are_431():
    chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
    assert refusal_status(chunked + b"X-T: " + b"t" * 300 + b"\r\n\r\n", SMALL) == 431


def test_the_parser_stays_failed():
    parser = RequestParser()
    parser.receive_data(b"GET / HTTP/3.0\r\n\r\n")
    for _ in range(2):
        with pytest.raises(ProtocolError) as info:
            parser.next_event()
        assert info.value.status == 505
    assert parser.phase == "error"


def test_phases():
    parser = RequestParser()
    assert parser.phase == "idle"
    parser.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n")
    assert parser.next_event() is NEED_DATA and parser.phase == "head"
    parser.receive_data(b"\r\nx")
    assert isinstance(parser.next_event(), RequestHead) and parser.phase == "body"
    parser.receive_data(b"y")
    assert parser.next_event() == BodyData(b"xy")
    assert parser.next_event() == EndOfRequest() and parser.phase == "idle"


class CountingPattern:
    """Wraps a compiled pattern and counts the bytes each search scans."""

    def __init__(self, pattern):
        self.pattern, self.num_scanned = pattern, 0

    def search(self, data, position):
        self.num_scanned += len(data) - position
        return self.pattern.search(data, position)


@pytest.mark.parametrize("num_headers", [50, 400])
def test_byte_by_byte_input_is_scanned_in_linear_time(monkeypatch, num_headers):
    counter = CountingPattern(receive_buffer.BLANK_LINE)
    monkeypatch.setattr("pyvlm.http.parser.BLANK_LINE", counter)
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-Header-%d: value\r\n" % i for i in range(num_headers)) + b"\r\n"
    head, _ = feed([raw[i : i + 1] for i in range(len(raw))], ParserLimits(max_header_count=1000))
    assert len(head.headers) == num_headers + 1
    assert counter.num_scanned <= 3 * len(raw)  # quadratic rescanning would be ~len(raw)**2 / 2
