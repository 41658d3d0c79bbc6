"""Fuzz targets for the sans-IO request parser, shared by the short CI tests
(tests/http/test_fuzz_http.py) and the long runs (benchmarks/fuzz.py).

The properties, h11's rule plus two of our own:

* only events or a ProtocolError: any byte string, then EOF, gives a
  well-formed event sequence (RequestHead BodyData* EndOfRequest)* and then
  ConnectionClosed or a ProtocolError with a status the parser documents;
  never another exception, never an endless stream of events;
* splitting never changes the outcome: fed whole, cut at arbitrary points,
  or byte by byte, the merged events and the error status are the same;
* linear time: parsing work grows at most linearly with the input. Work is
  counted deterministically (bytes the receive buffer scans and copies,
  plus next_event calls: `Outcome.work`, within `work_bound`) and, because
  the regexes run in C where nothing can be counted, also timed in thread
  CPU time when a segment is pumped 64x, against a bound that linear code
  meets with a wide margin and quadratic code misses (`check_linear`).

`fuzz_one_input(buf)` is the libFuzzer/atheris entry point (a split check);
`byte_pumps` and `segment_pump` give pumping checks on the entries of the
corpus it built.
"""

import gc
import random
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

from hypothesis import strategies as st

from pyvlm.http.errors import ProtocolError
from pyvlm.http.events import (
    NEED_DATA,
    BodyData,
    ConnectionClosed,
    EndOfRequest,
    ParserLimits,
    RequestHead,
)
from pyvlm.http.parser import RequestParser
from pyvlm.http.receive_buffer import ReceiveBuffer

ERROR_STATUSES = (400, 413, 417, 431, 501, 505)  # what the parser may raise
# Small limits so that fuzzed inputs of a few hundred bytes reach every limit.
SMALL_LIMITS = ParserLimits(max_header_bytes=512, max_header_count=8, max_body_bytes=256,
                            max_chunk_line_bytes=64)
PUMP_LIMITS = ParserLimits()  # the server's defaults: pumped inputs of tens of KiB fit

# Work per input is at most this affine bound (calibrated with ~4x headroom on
# the adversarial families: a quadratic scan exceeds it by orders of magnitude).
WORK_PER_BYTE, WORK_PER_PIECE, WORK_CONSTANT = 12, 24, 200
PUMP_SCALES = (1, 8, 64)  # how many times more often than the base input the segment repeats
PUMP_FACTOR = PUMP_SCALES[-1]
MIN_PUMPED_BYTES = 256  # the base input's pumped part: enough for a quadratic term to show
# Parse time may grow like size ** 1.5 (64x the input: 512x the time), not
# like size ** 2: linear code with noise passes, quadratic code does not.
TIME_EXPONENT = 1.5
TIME_FLOOR_S = 0.005  # a big input parsed in under this is fast whatever the ratio
PIECE_SIZES = (0, 1, 3, 7)  # how pumped inputs are fed (0: whole)

# A libFuzzer dictionary and hypothesis token soup: the parser's syntax.
HTTP_TOKENS = [
    b"GET / HTTP/1.1\r\n", b"POST /v1/chat/completions HTTP/1.1\r\n", b"GET / HTTP/1.0\r\n",
    b"GET http://a/b?c HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1\r\n", b"GET / HTTP/2.0\r\n",
    b"GET / HTTP/1.1\n", b"Host: a\r\n", b"Content-Length: 3\r\n", b"Content-Length: 0\r\n",
    b"Content-Length: 3, 3\r\n", b"Content-Length: 99999999999999999999\r\n",
    b"Content-Length: x\r\n", b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n", b"Expect: 100-continue\r\n",
    b"Connection: close\r\n", b"Connection: keep-alive\r\n", b"X-A: b\r\n", b" folded\r\n",
    b"X-A : b\r\n", b"\r\n", b"\n", b"\r", b"3\r\n", b"0\r\n", b"ff\r\n", b"3;ext=1\r\n",
    b"abc", b"\r\n\r\n", b" ", b"\t", b":", b";", b",", b"\x00", b"\x7f", b"\xff",
]  # fmt: skip


class CountingBuffer(ReceiveBuffer):
    """A ReceiveBuffer that tallies the bytes its operations touch: the
    deterministic measure of parsing work (`work`)."""

    def __init__(self) -> None:
        super().__init__()
        self.work = 0

    def append(self, data: bytes) -> None:
        self.work += len(data)
        super().append(data)

    def extract(self, max_bytes: int) -> bytes:
        out = super().extract(max_bytes)
        self.work += len(out) + 1
        return out

    def startswith(self, prefix: bytes) -> bool:
        self.work += len(prefix)
        return super().startswith(prefix)

    def find_end(self, pattern, max_match_bytes: int) -> Optional[int]:
        return super().find_end(_CountingPattern(pattern, self), max_match_bytes)


class _CountingPattern:
    """A compiled pattern whose searches add the bytes they scan to a
    CountingBuffer's work (counted where the scan really starts, whatever
    the buffer believes it has already searched)."""

    def __init__(self, pattern, buffer: CountingBuffer):
        self.pattern, self.buffer = pattern, buffer

    def search(self, data, pos: int = 0):
        match = self.pattern.search(data, pos)
        self.buffer.work += (len(data) if match is None else match.end()) - pos + 1
        return match


@dataclass(frozen=True)
class Outcome:
    """What a parser made of one input: merged events, then the error status
    (None when it ended in ConnectionClosed) and the work it took."""

    events: Tuple
    error_status: Optional[int]
    work: int

    def same_result(self, other: "Outcome") -> bool:
        return (self.events, self.error_status) == (other.events, other.error_status)


class EventChecker:
    """Asserts that events arrive in the parser's grammar, with bodies that
    match their framing."""

    def __init__(self, limits: ParserLimits):
        self.limits = limits
        self.head: Optional[RequestHead] = None  # inside a request
        self.num_body_bytes = 0
        self.is_closed = False  # ConnectionClosed seen, or a request without keep-alive

    def check(self, event) -> None:
        assert not self.is_closed or (isinstance(event, ConnectionClosed) and self.head is None), event
        if isinstance(event, RequestHead):
            self._check_head(event)
        elif isinstance(event, BodyData):
            self._check_body(event)
        elif isinstance(event, EndOfRequest):
            self._check_end()
        else:
            assert isinstance(event, ConnectionClosed) and self.head is None, event
            self.is_closed = True

    def check_phase(self, phase: str, num_buffered_bytes: int) -> None:
        """The parser's phase while it waits for data agrees with the events."""
        if self.is_closed:
            assert phase == "done", phase
        elif self.head is not None:
            assert phase == "body", phase
        else:
            assert phase == ("head" if num_buffered_bytes else "idle"), (phase, num_buffered_bytes)

    def _check_head(self, head: RequestHead) -> None:
        assert self.head is None, head
        assert head.http_version in ("1.0", "1.1") and head.method and head.target, head
        assert not head.is_chunked or head.content_length is None, head
        assert head.content_length is None or 0 <= head.content_length <= self.limits.max_body_bytes
        assert len(head.headers) <= self.limits.max_header_count
        self.head, self.num_body_bytes = head, 0

    def _check_body(self, body: BodyData) -> None:
        assert self.head is not None and isinstance(body.data, bytes) and body.data, body
        self.num_body_bytes += len(body.data)
        limit = self.head.content_length if not self.head.is_chunked else self.limits.max_body_bytes
        assert self.num_body_bytes <= (limit or 0), (self.head, self.num_body_bytes)

    def _check_end(self) -> None:
        assert self.head is not None
        if not self.head.is_chunked:
            assert self.num_body_bytes == (self.head.content_length or 0)
        self.is_closed = not self.head.keep_alive
        self.head = None


def parse(pieces: Sequence[bytes], limits: ParserLimits = SMALL_LIMITS) -> Outcome:
    """Feeds `pieces` then EOF, checking every event; never raises anything
    but AssertionError (a property violated)."""
    parser, checker, events = RequestParser(limits), EventChecker(limits), []
    parser._buffer = buffer = CountingBuffer()  # measure the work of this parser's buffer
    max_events = 2 * sum(map(len, pieces)) + 4  # each event but EndOfRequest consumes a byte
    try:
        for piece in list(pieces) + [b""]:
            parser.receive_data(piece)
            while True:
                event = parser.next_event()
                buffer.work += 1
                if event is NEED_DATA:
                    checker.check_phase(parser.phase, parser.num_buffered_bytes)
                    break
                checker.check(event)
                events.append(event)
                assert len(events) <= max_events, "the parser emits events without consuming input"
                if isinstance(event, ConnectionClosed):
                    return Outcome(merge_body_data(events), None, buffer.work)
    except ProtocolError as error:
        assert error.status in ERROR_STATUSES and error.message, (error.status, error.message)
        _check_stays_failed(parser, error)
        return Outcome(merge_body_data(events), error.status, buffer.work)
    raise AssertionError("EOF must end in ConnectionClosed or a ProtocolError")


def _check_stays_failed(parser: RequestParser, error: ProtocolError) -> None:
    """After a ProtocolError the parser raises it again, whatever it is fed."""
    assert parser.phase == "error"
    parser.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    try:
        parser.next_event()
    except ProtocolError as again:
        assert again is error
    else:
        raise AssertionError("a failed parser parsed again")


def merge_body_data(events) -> Tuple:
    """The events with consecutive BodyData joined (splitting may cut a body
    into more pieces; that is not a different outcome)."""
    merged: List = []
    for event in events:
        if isinstance(event, BodyData) and merged and isinstance(merged[-1], BodyData):
            merged[-1] = BodyData(merged[-1].data + event.data)
        else:
            merged.append(event)
    return tuple(merged)


def split(data: bytes, cuts: Sequence[int]) -> List[bytes]:
    """`data` cut at the given offsets (taken modulo its length + 1)."""
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
    return [piece for piece in pieces if piece]  # b"" would mean EOF


def bytewise(data: bytes) -> List[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def in_pieces(data: bytes, piece_size: int) -> List[bytes]:
    """`data` in pieces of `piece_size` bytes (0: whole)."""
    if piece_size <= 0:
        return [data] if data else []
    return [data[i : i + piece_size] for i in range(0, len(data), piece_size)]


def work_bound(data: bytes, num_pieces: int) -> int:
    return WORK_PER_BYTE * len(data) + WORK_PER_PIECE * num_pieces + WORK_CONSTANT


def check_splits(data: bytes, cuts: Sequence[int], limits: ParserLimits = SMALL_LIMITS) -> Outcome:
    """Whole, cut at `cuts` and byte by byte: the same outcome, each within
    the linear work bound. Returns the whole-input outcome."""
    whole = parse(in_pieces(data, 0), limits)
    for pieces in (split(data, cuts), bytewise(data)):
        other = parse(pieces, limits)
        assert other.same_result(whole), (pieces, whole, other)
        assert other.work <= work_bound(data, len(pieces)), (other.work, len(data), len(pieces))
    assert whole.work <= work_bound(data, 1), (whole.work, len(data))
    return whole


# -- linear time: pumping a segment ------------------------------------------
@dataclass(frozen=True)
class LinearReport:
    """An input with its segment pumped 1x, 8x and 64x: sizes, counted work,
    and the CPU time of the 64x one against its reference, the smallest one
    that took the same path (`reference_factor` 64: the 1x one, 8: the 8x
    one, 0: neither, so time was not compared)."""

    sizes: Tuple[int, ...]
    works: Tuple[int, ...]
    reference_factor: int
    reference_s: float
    big_s: float

    @property
    def time_ratio(self) -> float:
        return self.big_s / self.reference_s if self.reference_factor else 0.0


def pumped(prefix: bytes, segment: bytes, suffix: bytes, factor: int = 1) -> bytes:
    """prefix + segment repeated (at least MIN_PUMPED_BYTES, times factor) + suffix."""
    reps = -(-MIN_PUMPED_BYTES // max(1, len(segment))) * factor
    return prefix + segment * reps + suffix


def check_linear(prefix: bytes, segment: bytes, suffix: bytes, piece_size: int = 0,
                 limits: ParserLimits = PUMP_LIMITS) -> LinearReport:
    """Asserts that pumping the segment 64x (fed in pieces of `piece_size`
    bytes, 0: whole) keeps the counted work within the linear bound and the
    CPU time within factor ** TIME_EXPONENT of the reference's (a quadratic
    cost grows like factor ** 2). Returns the measurements."""
    inputs = [pumped(prefix, segment, suffix, factor) for factor in PUMP_SCALES]
    outcomes = [parse(in_pieces(data, piece_size), limits) for data in inputs]
    for data, outcome in zip(inputs, outcomes):
        num_pieces = len(in_pieces(data, piece_size))
        assert outcome.work <= work_bound(data, num_pieces), (
            "parse work grows faster than the input", len(data), outcome.work)
    factor, reference = _reference(inputs, outcomes)
    reference_s = big_s = 0.0
    if reference is not None:
        reference_s, big_s = _cpu_times(reference, inputs[-1], factor, piece_size, limits)
        assert big_s < TIME_FLOOR_S or big_s <= factor**TIME_EXPONENT * reference_s, (
            "parse time grows faster than the input", reference_s, big_s, len(reference),
            len(inputs[-1]))
    return LinearReport(tuple(map(len, inputs)), tuple(o.work for o in outcomes), factor,
                        reference_s, big_s)


def _reference(inputs, outcomes) -> Tuple[int, Optional[bytes]]:
    """(size factor, input) of the smallest input that ended like the biggest
    (the same error status and kinds of events): an input that stops early,
    say mid-body, costs less per byte, so its time says nothing."""
    def path(outcome: Outcome):
        return outcome.error_status, frozenset(type(event) for event in outcome.events)

    for scale, data, outcome in zip(PUMP_SCALES[:-1], inputs, outcomes):
        if path(outcome) == path(outcomes[-1]):
            return PUMP_SCALES[-1] // scale, data
    return 0, None


def _cpu_times(reference: bytes, big: bytes, factor: int, piece_size: int, limits) -> Tuple[float, float]:
    """Thread CPU seconds (least of a few runs) of parsing each input; the
    big one is re-measured only when it looks super-linear, so a scheduling
    hiccup costs a retry, not a false alarm."""
    reference_s = _least_cpu_time(reference, piece_size, limits, 5)
    big_s = _least_cpu_time(big, piece_size, limits, 1)
    if big_s >= TIME_FLOOR_S and big_s > factor**TIME_EXPONENT * reference_s:
        reference_s = min(reference_s, _least_cpu_time(reference, piece_size, limits, 20))
        big_s = min(big_s, _least_cpu_time(big, piece_size, limits, 2))
    return reference_s, big_s


def _least_cpu_time(data: bytes, piece_size: int, limits, repeats: int) -> float:
    pieces, best = in_pieces(data, piece_size) + [b""], float("inf")
    was_enabled = gc.isenabled()
    gc.disable()  # a collection is not the parser's work
    try:
        for _ in range(repeats):
            start = time.thread_time()
            _drain(RequestParser(limits), pieces)
            best = min(best, time.thread_time() - start)
    finally:
        if was_enabled:
            gc.enable()
    return best


def _drain(parser: RequestParser, pieces: Sequence[bytes]) -> None:
    """Parses without checks (the timed path)."""
    try:
        for piece in pieces:
            parser.receive_data(piece)
            while (event := parser.next_event()) is not NEED_DATA:
                if isinstance(event, ConnectionClosed):
                    return
    except ProtocolError:
        return


def _request(head_lines: bytes, body: bytes = b"") -> bytes:
    return b"POST /v1/completions HTTP/1.1\r\nHost: a\r\n" + head_lines + b"\r\n" + body


# Named adversarial shapes: (prefix, pumped segment, suffix, piece size).
ADVERSARIAL = {
    "long header line": (_request(b"")[:-2] + b"X-Long: ", b"abcdefgh", b"\r\n\r\n", 0),
    "long header line, trickled": (_request(b"")[:-2] + b"X-Long: ", b"abcdefgh", b"\r\n\r\n", 1),
    "whitespace inside a header value": (_request(b"")[:-2] + b"X-A: a", b" \t", b"b\r\n\r\n", 0),
    "whitespace around a header value": (_request(b"")[:-2] + b"X-A:", b" ", b"b \t\r\n\r\n", 0),
    "long request target": (b"GET /", b"a/b%20", b" HTTP/1.1\r\nHost: a\r\n\r\n", 0),
    "long Content-Length list": (_request(b"")[:-2] + b"Content-Length: 0", b", 0", b"\r\n\r\n", 0),
    "many pipelined requests": (b"", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"", 0),
    "many pipelined requests, trickled": (b"", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"", 3),
    "many leading blank lines": (b"", b"\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1),
    "many tiny chunks": (_request(b"Transfer-Encoding: chunked\r\n"), b"1\r\nz\r\n", b"0\r\n\r\n", 0),
    "many tiny chunks, trickled": (_request(b"Transfer-Encoding: chunked\r\n"), b"1;e=v\r\nz\r\n",
                                   b"0\r\n\r\n", 1),
    # A long body trickling in until the peer gives up (a 400 at EOF at every size).
    "trickled body": (_request(b"Content-Length: 1000000\r\n"), b"0123456789abcdef", b"", 1),
    "trickled trailer": (_request(b"Transfer-Encoding: chunked\r\n") + b"0\r\nX-T: ", b"tt",
                         b"\r\n\r\n", 1),
}  # fmt: skip


# -- the libFuzzer / atheris entry point ---------------------------------------
def fuzz_one_input(buf: bytes) -> Outcome:
    """One fuzzer input, a split check: byte 0 seeds the cut points, the
    rest is the request stream. (Pumping is too slow to run per execution;
    byte_pumps and segment_pump run it on the corpus the fuzzer built.)"""
    data = buf[1:]
    return check_splits(data, random_cuts(buf[0], len(data)) if buf else [])


def random_cuts(seed: int, size: int) -> List[int]:
    rng = random.Random(seed)
    return [rng.randrange(size + 1) for _ in range(seed % 9)]


def segment_pump(buf: bytes, rng: random.Random) -> Tuple[bytes, bytes, bytes, int]:
    """check_linear's arguments for a corpus entry's stream with a random
    segment of 1-16 bytes pumped, fed whole or in 7-byte pieces (byte-by-byte
    feeding of 16 KiB is too slow here; ADVERSARIAL covers trickling)."""
    data = buf[1:] or b" "
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(1, 16))
    return data[:start], data[start:end], data[end:], rng.choice((0, 7))


def byte_pumps(buf: bytes) -> Iterator[Tuple[bytes, bytes, bytes, int]]:
    """check_linear's arguments with each byte of a corpus entry's stream
    pumped in turn (one position per run of equal bytes), fed whole: a
    systematic search for a byte whose repetition costs super-linear time."""
    data = buf[1:]
    for i in range(len(data)):
        if i == 0 or data[i] != data[i - 1]:
            yield data[:i], data[i : i + 1], data[i + 1 :], 0


# Valid request streams: each adversarial shape pumped 4x (but the body
# that never ends), and a few more.
SEED_STREAMS = [prefix + segment * 4 + suffix for name, (prefix, segment, suffix, _)
                in ADVERSARIAL.items() if name != "trickled body"] + [
    _request(b"Content-Length: 64\r\n", bytes(range(64))),
    _request(b"Content-Length: 3\r\n", b"abc") + b"GET / HTTP/1.0\r\n\r\n",
    _request(b"Transfer-Encoding: chunked\r\n", b"3;x=y\r\nabc\r\n0\r\nX-T: v\r\n\r\n"),
    _request(b"Expect: 100-continue\r\nContent-Length: 1\r\nConnection: close\r\n", b"z"),
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /x HTTP/1.0\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
]  # fmt: skip


def seed_corpus() -> List[bytes]:
    """SEED_STREAMS in fuzz_one_input's encoding: inputs for the fuzzer to start from."""
    return [bytes([seed]) + stream for seed, stream in enumerate(SEED_STREAMS)]


def mutate(stream: bytes, edits: Sequence[Tuple[int, int, bytes]]) -> bytes:
    """`stream` with each (offset, number of bytes deleted, bytes inserted)
    edit applied in turn (offsets taken modulo the length + 1)."""
    data = bytearray(stream)
    for offset, num_deleted, inserted in edits:
        at = offset % (len(data) + 1)
        data[at : at + num_deleted] = inserted
    return bytes(data)


# -- hypothesis strategies (the CI tests and the fallback without atheris) -----
tokens = st.sampled_from(HTTP_TOKENS) | st.binary(max_size=6)
soup = st.lists(tokens, max_size=40).map(b"".join)
edits = st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 3), tokens), max_size=4)
# A few valid streams, pipelined, with a few edits each: deeper than soup.
mutated_streams = st.lists(st.builds(mutate, st.sampled_from(SEED_STREAMS), edits),
                           min_size=1, max_size=3).map(b"".join)
cut_lists = st.lists(st.integers(0, 2000), max_size=10)
split_cases = st.tuples(st.binary(max_size=400) | soup | mutated_streams, cut_lists)  # check_splits(*case)
pump_cases = st.tuples(soup, st.sampled_from(HTTP_TOKENS) | st.binary(min_size=1, max_size=16),
                       soup, st.sampled_from(PIECE_SIZES))  # check_linear(*case)
