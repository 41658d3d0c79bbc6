"""Short fuzz runs of the request parser (the long ones: benchmarks/fuzz.py).

On top of test_parser_properties.py (events or a protocol error; stdlib
requests round-trip), these check, with the targets of fuzz_targets.py:
the same outcome fed whole, cut anywhere and byte by byte (events before
an error included), the event grammar, a linear bound on the work of every
input, and linear time on adversarial shapes pumped 64x.
"""

import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvlm.http import head
from pyvlm.http.errors import ProtocolError
from pyvlm.http.events import RequestHead
from tests.http import fuzz_targets
from tests.http.fuzz_targets import (
    ADVERSARIAL,
    PUMP_FACTOR,
    byte_pumps,
    check_linear,
    check_splits,
    cut_lists,
    fuzz_one_input,
    mutated_streams,
    pump_cases,
    segment_pump,
    seed_corpus,
    soup,
)

SHORT = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SHORT
@given(st.binary(max_size=400), cut_lists)
def test_arbitrary_bytes_have_one_outcome_however_split(data, cut_points):
    check_splits(data, cut_points)


@SHORT
@given(soup, cut_lists)
def test_http_soup_has_one_outcome_however_split(data, cut_points):
    check_splits(data, cut_points)


@SHORT
@given(mutated_streams, cut_lists)
def test_edited_valid_streams_have_one_outcome_however_split(data, cut_points):
    check_splits(data, cut_points)


def test_the_seed_streams_are_valid_requests():
    for stream in fuzz_targets.SEED_STREAMS:
        outcome = check_splits(stream, [], fuzz_targets.PUMP_LIMITS)
        assert outcome.error_status is None and isinstance(outcome.events[0], RequestHead), stream


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pump_cases)
def test_pumping_a_soup_segment_costs_linear_work(case):
    check_linear(*case)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_the_fuzz_entry_point_takes_any_bytes(buf):
    fuzz_one_input(buf)


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_shapes_parse_in_linear_time(name):
    prefix, segment, suffix, piece_size = ADVERSARIAL[name]
    report = check_linear(prefix, segment, suffix, piece_size)
    assert report.sizes[-1] >= PUMP_FACTOR * (report.sizes[0] - len(prefix + suffix))
    assert report.works[-1] > report.works[0]  # the pumped input really was parsed further
    assert report.reference_factor == PUMP_FACTOR  # the base input took the same path


def test_adversarial_shapes_are_valid_requests():
    """The shapes exercise the parser's success paths, not an early refusal."""
    for name, (prefix, segment, suffix, piece_size) in ADVERSARIAL.items():
        for factor in (1, PUMP_FACTOR):
            data = fuzz_targets.pumped(prefix, segment, suffix, factor)
            outcome = fuzz_targets.parse(fuzz_targets.in_pieces(data, piece_size),
                                         fuzz_targets.PUMP_LIMITS)
            expected = 400 if name == "trickled body" else None  # that body never ends
            assert outcome.error_status == expected, (name, factor, outcome.error_status)


def test_the_seed_corpus_passes_the_fuzz_entry_point_and_pumping():
    rng = random.Random()
    for entry in seed_corpus():
        fuzz_one_input(entry)
        check_linear(*segment_pump(entry, rng))


def test_pumping_each_byte_finds_the_whitespace_run_in_a_header_value():
    """byte_pumps, run on the corpus after a fuzz campaign, reaches the
    space inside a header value (the quadratic regex it would have caught)."""
    entry = b"\x00GET / HTTP/1.1\r\nHost: a\r\nX-A: a b\r\n\r\n"
    pumps = list(byte_pumps(entry))
    assert (entry[1:-8], b" ", entry[-7:], 0) in pumps
    for pump in pumps:
        check_linear(*pump)


def test_a_quadratic_rescan_breaks_the_work_bound(monkeypatch):
    """The work bound catches a buffer that forgets how far it searched."""
    original = fuzz_targets.ReceiveBuffer.find_end

    def rescan_from_start(self, pattern, max_match_bytes):
        self._searched = 0
        return original(self, pattern, max_match_bytes)

    monkeypatch.setattr(fuzz_targets.ReceiveBuffer, "find_end", rescan_from_start)
    data = fuzz_targets.pumped(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: ", b"b", b"\r\n\r\n")
    with pytest.raises(AssertionError):
        check_splits(data, [])


# The header-line regex before it was found quadratic: the reference for its replacement.
OLD_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*(.*?)[ \t]*")


@SHORT
@given(st.lists(st.sampled_from([b"X-A", b":", b" ", b"\t", b"a", b"\r", b"\x00", b"\xe9", b" :"]),
                max_size=20).map(b"".join))
def test_header_lines_parse_as_with_the_old_regex(line):
    match = OLD_HEADER_LINE.fullmatch(line)
    try:
        parsed = head._parse_header_line(line)
    except ProtocolError:
        assert match is None or re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", match.group(2))
    else:
        assert parsed == (match.group(1).decode().lower(), match.group(2).decode("latin-1"))


def test_the_time_check_catches_the_old_header_regex(monkeypatch):
    monkeypatch.setattr(head, "_HEADER_LINE", OLD_HEADER_LINE)
    with pytest.raises(AssertionError, match="parse time grows faster"):
        check_linear(*ADVERSARIAL["whitespace inside a header value"])


def test_a_chunk_size_line_of_exactly_the_limit_is_accepted_however_split():
    """Found by atheris: fed byte by byte, the CR of a chunk-size line of
    exactly max_chunk_line_bytes was counted against the limit (a 400 that
    the whole input did not get)."""
    line = b"1;" + b"e" * (fuzz_targets.SMALL_LIMITS.max_chunk_line_bytes - 2)
    data = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            + line + b"\r\nz\r\n0\r\n\r\n")
    assert check_splits(data, []).error_status is None
    assert check_splits(data.replace(b";e", b";ee", 1), []).error_status == 400  # one byte over


def test_the_time_reference_is_an_input_that_took_the_same_path():
    """Found by pumping the atheris corpus: blank lines after a body that
    only the pumped input completes cost more per byte than the base input's
    unfinished body; the 8x input, which completes it too, is the reference."""
    prefix = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 641\r\n"
    report = check_linear(prefix, b"\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert report.reference_factor == 8
