"""Parsing and validating a request head: the request line, the header
fields, and the framing they imply (RFC 9112 sections 3, 5 and 6)."""

import re
from typing import Dict, List, Optional, Sequence

from pyvlm.http.errors import ProtocolError
from pyvlm.http.events import ParserLimits, RequestHead
from pyvlm.http.types import Headers

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
# Only the name is matched by a regex: `:[ \t]*(.*?)[ \t]*` backtracks
# quadratically over a run of spaces inside a value (64 KiB of them cost
# ~10 s of CPU on the event loop), so the value is stripped with bytes.strip.
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):(.*)")
_FORBIDDEN_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CONTENT_LENGTH = re.compile(r"[0-9]{1,20}")  # h11's bound: no bignum parsing


def build_head(section: bytes, limits: ParserLimits) -> RequestHead:
    """A RequestHead from a complete head section (ending in a blank line)."""
    lines = [line[:-1] if line.endswith(b"\r") else line for line in section.split(b"\n")][:-2]
    method, target, version = parse_request_line(lines[0])
    headers = parse_header_lines(lines[1:], limits)
    return _with_framing(method, target, version, headers, limits)


def parse_request_line(line: bytes):
    """(method, target, "1.0"|"1.1"); 505 for other HTTP versions."""
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise ProtocolError(400, "malformed request line")
    method, target, major, minor = match.groups()
    if (major, minor) not in ((b"1", b"0"), (b"1", b"1")):
        raise ProtocolError(505, f"HTTP version {major.decode()}.{minor.decode()} is not supported")
    target = target.decode("ascii")
    if not (target.startswith("/") or target == "*" or _is_absolute_form(target)):
        raise ProtocolError(400, "malformed request target")
    return method.decode("ascii"), target, f"{major.decode()}.{minor.decode()}"


def _is_absolute_form(target: str) -> bool:
    return target.lower().startswith(("http://", "https://"))


def parse_header_lines(lines: Sequence[bytes], limits: ParserLimits) -> Headers:
    """Validated (lower-cased name, value) pairs; obs-fold and stray
    whitespace before the colon are refused (RFC 9112 5.1, 5.2)."""
    if len(lines) > limits.max_header_count:
        raise ProtocolError(431, f"more than {limits.max_header_count} header fields")
    return [_parse_header_line(line) for line in lines]


def _parse_header_line(line: bytes):
    match = _HEADER_LINE.fullmatch(line)
    if match is None:
        raise ProtocolError(400, "malformed header line")
    name, value = match.group(1), match.group(2).strip(b" \t")  # RFC 9112 5.1: OWS around the value
    if _FORBIDDEN_IN_VALUE.search(value):
        raise ProtocolError(400, "control character in a header value")
    return name.decode("ascii").lower(), value.decode("latin-1")


_FRAMING_NAMES = frozenset(["host", "transfer-encoding", "content-length", "expect", "connection"])


def _framing_values(headers: Headers) -> Dict[str, List[str]]:
    """The values of the headers that decide framing, in one pass."""
    found: Dict[str, List[str]] = {}
    for name, value in headers:
        if name in _FRAMING_NAMES:
            found.setdefault(name, []).append(value)
    return found


def _tokens(values: Sequence[str]) -> List[str]:
    return [token.strip().lower() for value in values for token in value.split(",")]


def _with_framing(method: str, target: str, version: str, headers: Headers, limits) -> RequestHead:
    framing = _framing_values(headers)
    if version == "1.1" and len(framing.get("host", ())) != 1:
        raise ProtocolError(400, "an HTTP/1.1 request needs exactly one Host header")
    is_chunked = _is_chunked(framing, version)
    content_length = None if is_chunked else _content_length(framing, limits)
    return RequestHead(
        method=method,
        target=target,
        http_version=version,
        headers=headers,
        content_length=content_length,
        is_chunked=is_chunked,
        expects_continue=_expects_continue(framing, version),
        keep_alive=_keeps_alive(framing, version),
    )


def _is_chunked(framing: Dict[str, List[str]], version: str) -> bool:
    """Only `chunked` alone is accepted. Content-Length together with
    Transfer-Encoding is refused: proxies that disagree on which one frames
    the body are how requests get smuggled (RFC 9112 6.1, 11.2)."""
    codings = _tokens(framing.get("transfer-encoding", ()))
    if not codings:
        return False
    if "content-length" in framing:
        raise ProtocolError(400, "a request cannot have both Content-Length and Transfer-Encoding")
    if version == "1.0":
        raise ProtocolError(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
    if "" in codings or ("chunked" in codings and codings != ["chunked"] and codings[-1] != "chunked"):
        raise ProtocolError(400, "malformed Transfer-Encoding")
    if codings.count("chunked") > 1:
        raise ProtocolError(400, "chunked applied more than once")
    if codings != ["chunked"]:
        raise ProtocolError(501, "only the chunked transfer coding is supported")
    return True


def _content_length(framing: Dict[str, List[str]], limits: ParserLimits) -> Optional[int]:
    values = _tokens(framing.get("content-length", ()))
    if not values:
        return None
    if any(_CONTENT_LENGTH.fullmatch(value) is None for value in values) or len(set(values)) > 1:
        raise ProtocolError(400, "malformed Content-Length")
    length = int(values[0])
    if length > limits.max_body_bytes:
        raise ProtocolError(413, f"the request body ({length} bytes) exceeds {limits.max_body_bytes} bytes")
    return length


def _expects_continue(framing: Dict[str, List[str]], version: str) -> bool:
    expectations = _tokens(framing.get("expect", ()))
    if version == "1.0" or not expectations:
        return False  # RFC 9110 10.1.1: ignore 100-continue from HTTP/1.0
    if expectations != ["100-continue"]:
        raise ProtocolError(417, "only Expect: 100-continue is supported")
    return True


def _keeps_alive(framing: Dict[str, List[str]], version: str) -> bool:
    options = _tokens(framing.get("connection", ()))
    if version == "1.0":
        return "keep-alive" in options
    return "close" not in options
