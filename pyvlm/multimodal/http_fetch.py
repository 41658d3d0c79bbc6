"""A minimal asyncio HTTP/1.1 GET client for image URLs (no torch).

Made for untrusted URLs: the host is checked by address_policy after
resolution and the connection goes to that checked IP (the original name is
kept for the Host header and TLS SNI/certificate check); every redirect is
checked again; the connect and the whole fetch have deadlines; the body is
capped while it streams (Content-Length is checked before reading, chunked
and close-delimited bodies are counted as they arrive). The Content-Type is
ignored: the decoder sniffs the format from the bytes.
"""

import asyncio
import ssl
from dataclasses import dataclass
from typing import Optional
from urllib.parse import unquote, urljoin, urlsplit

from .address_policy import AddressError, resolve_checked

_MAX_HEAD_BYTES = 64 << 10
_CHUNK_BYTES = 1 << 16
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_DEFAULT_PORTS = {"http": 80, "https": 443}


class FetchError(ValueError):
    """An image URL could not be fetched; the message is safe to show a client."""


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one URL fetch (all redirects included in the timeouts)."""

    max_bytes: int
    connect_timeout_s: float
    total_timeout_s: float
    max_redirects: int
    allow_private: bool


@dataclass(frozen=True)
class Target:
    """Where one GET goes: scheme, host as written (no brackets), port, request path."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        is_default_port = self.port == _DEFAULT_PORTS[self.scheme]
        return host if is_default_port else f"{host}:{self.port}"


def parse_target(url: str) -> Target:
    """Splits an http(s) URL; refuses other schemes, credentials and bad ports."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise FetchError("image URL is malformed") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise FetchError("image URL must use http or https")
    if parts.username is not None or parts.password is not None:
        raise FetchError("image URLs with credentials are not supported")
    host = _normalized_host(parts.hostname or "")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host, port or _DEFAULT_PORTS[parts.scheme], path)


def _normalized_host(host: str) -> str:
    # URL hosts are percent-decoded and IDNA-encoded before use (WHATWG host parsing).
    host = unquote(host)
    if not host or any(char in host for char in " /\\@#?\x00"):
        raise FetchError("image URL has no valid host (it must look like http(s)://host/path)")
    try:
        return host if host.isascii() else host.encode("idna").decode("ascii")
    except UnicodeError:
        raise FetchError("image URL has no valid host") from None


def default_ssl_context() -> ssl.SSLContext:
    """Certificate and hostname verification on (a module attribute for tests)."""
    return ssl.create_default_context()


async def open_tcp(ip: str, port: int, ssl_context: Optional[ssl.SSLContext],
                   server_hostname: Optional[str]):
    """Opens the connection to an already checked IP (replaced in tests to
    prove that refused URLs never connect)."""
    return await asyncio.open_connection(ip, port, ssl=ssl_context, limit=_MAX_HEAD_BYTES,
                                         server_hostname=server_hostname)


async def fetch_url(url: str, limits: FetchLimits) -> bytes:
    """The body of GET `url`, following at most limits.max_redirects redirects."""
    try:
        async with asyncio.timeout(limits.total_timeout_s):
            return await _follow_redirects(url, limits)
    except TimeoutError:
        raise FetchError(f"fetching the image URL took longer than "
                         f"{limits.total_timeout_s:g} s") from None


async def _follow_redirects(url: str, limits: FetchLimits) -> bytes:
    for _ in range(limits.max_redirects + 1):
        status, location, body = await _get_once(parse_target(url), limits)
        if status not in _REDIRECT_STATUSES:
            return body
        url = urljoin(url, location)
    raise FetchError(f"image URL redirected more than {limits.max_redirects} times")


async def _get_once(target: Target, limits: FetchLimits):
    """(status, location, body) of one GET; the body only for a 2xx answer."""
    try:
        addresses = await resolve_checked(target.host, target.port, limits.allow_private)
    except AddressError as exc:
        raise FetchError(str(exc)) from None
    reader, writer = await _connect(target, addresses, limits.connect_timeout_s)
    try:
        writer.write(_request_bytes(target))
        status, headers = await _read_head(reader)
        if status in _REDIRECT_STATUSES:
            return status, _location(headers), b""
        if not 200 <= status < 300:
            raise FetchError(f"image URL answered HTTP {status}")
        return status, None, await _read_body(reader, headers, limits.max_bytes)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
        raise FetchError("the image server closed the connection or sent a malformed "
                         "response") from None
    finally:
        writer.close()


async def _connect(target: Target, addresses: list, timeout_s: float):
    """Tries each checked address in turn within the connect timeout."""
    ssl_context = default_ssl_context() if target.scheme == "https" else None
    server_hostname = target.host if ssl_context is not None else None
    for address in addresses:
        try:
            return await asyncio.wait_for(
                open_tcp(str(address), target.port, ssl_context, server_hostname), timeout_s)
        except ssl.SSLError:
            raise FetchError("TLS handshake with the image server failed") from None
        except (OSError, TimeoutError):
            continue
    raise FetchError(f"could not connect to the image server within {timeout_s:g} s")


def _request_bytes(target: Target) -> bytes:
    lines = [f"GET {target.path} HTTP/1.1", f"Host: {target.host_header}", "User-Agent: pyvlm",
             "Accept: image/*", "Accept-Encoding: identity", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii", "strict")


async def _read_head(reader: asyncio.StreamReader):
    """(status, headers) of the final response, skipping 1xx interim responses."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status, headers = _parse_head(head)
        if status >= 200 or status == 101:
            return status, headers


def _parse_head(head: bytes):
    lines = head.decode("latin-1").split("\r\n")
    fields = lines[0].split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
        raise FetchError("the image server sent a malformed response")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(fields[1]), headers


def _location(headers: dict) -> str:
    values = headers.get("location")
    if not values:
        raise FetchError("image URL redirected without a Location")
    return values[0]


async def _read_body(reader: asyncio.StreamReader, headers: dict, max_bytes: int) -> bytes:
    codings = ",".join(headers.get("transfer-encoding", [])).lower()
    if codings:
        if [coding.strip() for coding in codings.split(",")] != ["chunked"]:
            raise FetchError("the image server used an unsupported transfer coding")
        return await _read_chunked(reader, max_bytes)
    length = _content_length(headers)
    if length is None:
        return await _read_until_close(reader, max_bytes)
    _check_size(length, max_bytes)
    return await reader.readexactly(length)


def _content_length(headers: dict) -> Optional[int]:
    values = set(headers.get("content-length", []))
    if not values:
        return None
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise FetchError("the image server sent an invalid Content-Length")
    return int(next(iter(values)))


def _check_size(num_bytes: int, max_bytes: int) -> None:
    if num_bytes > max_bytes:
        raise FetchError(f"the image is larger than the limit of {max_bytes} bytes")


async def _read_until_close(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    chunks, num_bytes = [], 0
    while chunk := await reader.read(_CHUNK_BYTES):
        num_bytes += len(chunk)
        _check_size(num_bytes, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_chunked(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    chunks, num_bytes = [], 0
    while (size := _chunk_size(await reader.readuntil(b"\r\n"))) > 0:
        num_bytes += size
        _check_size(num_bytes, max_bytes)  # before reading the chunk itself
        chunks.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise FetchError("the image server sent a malformed chunked body")
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass  # trailer fields, ignored
    return b"".join(chunks)


def _chunk_size(line: bytes) -> int:
    digits = line.split(b";", 1)[0].strip()
    if not digits or len(digits) > 16 or any(byte not in b"0123456789abcdefABCDEF" for byte in digits):
        raise FetchError("the image server sent a malformed chunked body")
    return int(digits, 16)
