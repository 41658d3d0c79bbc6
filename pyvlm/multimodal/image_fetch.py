"""Getting the encoded bytes of a request image: bytes, a path, a data URI or a URL.

Every source is read under a byte cap (checked while reading, never after),
and URLs under a connect and a total timeout with at most a few redirects,
so one request cannot make the server read an unbounded body or hang.
"""

import base64
import binascii
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

ImageSource = Union[bytes, bytearray, memoryview, str, Path]

_CHUNK_BYTES = 1 << 16
_DATA_URI = re.compile(r"data:(image/[A-Za-z0-9.+-]+)((?:;[^;,]*)*);base64,(.*)", re.DOTALL)
# RFC 3986 §3.1 scheme syntax. §4.2: a relative path's first segment cannot
# hold a colon (write "./a:b"), so "htp:/x" is a URL with a mistyped scheme.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31}):")
OFFLINE_SOURCES = "http://, https://, data:image/<type>;base64,<payload>, or a local file path"


class ImageError(ValueError):
    """An image could not be fetched or decoded; the message says why (HTTP 400)."""


@dataclass(frozen=True)
class ImageLimits:
    """What loading one image may cost.

    max_bytes caps the encoded size (file, data URI payload, HTTP body);
    max_pixels caps width * height, checked from the header before decoding
    (decompression bombs). timeout_s bounds the connection and the whole
    download. allow_local_paths must be False where the source comes from a
    remote client (a path would read the server's files).
    """

    max_bytes: int = 32 << 20
    max_pixels: int = 64_000_000
    timeout_s: float = 10.0
    max_redirects: int = 3
    allow_local_paths: bool = True
    allow_urls: bool = True


DEFAULT_LIMITS = ImageLimits()


def fetch_image_bytes(source: ImageSource, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """The encoded bytes of `source` (bytes, path, data: URI or http(s) URL)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _capped(bytes(source), limits.max_bytes, "image bytes")
    if isinstance(source, Path):
        return read_path(source, limits)
    if not isinstance(source, str):
        raise ImageError(f"unsupported image source type {type(source).__name__}")
    scheme = url_scheme(source)
    if scheme == "data":
        return decode_data_uri("data:" + source[5:], limits.max_bytes)
    if scheme in ("http", "https"):
        return fetch_url(source, limits)
    if scheme is not None:
        raise unsupported_scheme(scheme, OFFLINE_SOURCES)
    return read_path(Path(source), limits)


def url_scheme(source: str) -> Optional[str]:
    """The lowercased URL scheme `source` starts with, or None for a plain path."""
    match = _SCHEME.match(source)
    return match.group(1).lower() if match else None


def unsupported_scheme(scheme: str, supported: str) -> ImageError:
    """The refusal of an image URL whose scheme is none of `supported`."""
    return ImageError(f"image URL scheme '{scheme}:' is not a supported URL scheme "
                      f"(supported: {supported})")


def _capped(data: bytes, max_bytes: int, what: str) -> bytes:
    if len(data) > max_bytes:
        raise ImageError(f"{what} is {len(data)} bytes, more than the limit of {max_bytes}")
    return data


def read_path(path: Path, limits: ImageLimits) -> bytes:
    """A local file, read no further than max_bytes + 1."""
    if not limits.allow_local_paths:
        raise ImageError("local image paths are not allowed here")
    try:
        with open(path, "rb") as file:
            data = file.read(limits.max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"cannot read image file {str(path)!r}: {exc.strerror or exc}") from None
    return _capped(data, limits.max_bytes, f"image file {str(path)!r}")


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """The payload of a `data:image/...;base64,` URI; base64 is checked strictly
    (no characters outside the alphabet, correct padding)."""
    match = _DATA_URI.fullmatch(uri)
    if match is None:
        raise ImageError("data URI must look like data:image/<type>;base64,<payload>")
    payload = match.group(3)
    if len(payload) // 4 * 3 > max_bytes:
        raise ImageError(f"data URI payload is larger than the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"data URI payload is not valid base64: {exc}") from None


class _LimitedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most max_redirections redirects, and only to http(s)."""

    def __init__(self, max_redirects: int):
        super().__init__()
        self.max_redirections = max_redirects

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.startswith(("http://", "https://")):
            raise ImageError(f"image URL redirected to a non-http URL {newurl[:60]!r}")
        if self.max_redirections == 0:
            raise ImageError("image URL redirects, and redirects are not allowed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, limits: ImageLimits) -> bytes:
    """GET url: connect timeout, total deadline, byte cap while reading."""
    if not limits.allow_urls:
        raise ImageError("image URLs are not allowed here")
    opener = urllib.request.build_opener(_LimitedRedirects(limits.max_redirects))
    request = urllib.request.Request(url, headers={"User-Agent": "pyvlm"})
    deadline = time.monotonic() + limits.timeout_s
    try:
        with opener.open(request, timeout=limits.timeout_s) as response:
            _check_content_length(response.headers.get("Content-Length"), limits.max_bytes)
            return _read_body(response, limits.max_bytes, deadline)
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:  # urllib's refusal: too many hops, a loop, or a bad scheme
            raise ImageError(f"image URL redirect refused (at most {limits.max_redirects} "
                             f"http(s) redirects): {exc.reason}") from None
        raise ImageError(f"fetching image URL failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageError(f"fetching image URL failed: {reason}") from None


def _check_content_length(value, max_bytes: int) -> None:
    if value is not None and value.isdigit() and int(value) > max_bytes:
        raise ImageError(f"image URL body is {value} bytes, more than the limit of {max_bytes}")


def _read_body(response, max_bytes: int, deadline: float) -> bytes:
    """Reads what has arrived (read1, never waiting for a full chunk); each
    read is bounded by the socket timeout and the body by the deadline, so a
    slow drip cannot hold the request past deadline + one socket timeout."""
    chunks, num_bytes = [], 0
    while True:
        if time.monotonic() > deadline:
            raise ImageError("fetching image URL timed out")
        chunk = response.read1(_CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        num_bytes += len(chunk)
        if num_bytes > max_bytes:
            raise ImageError(f"image URL body is larger than the limit of {max_bytes} bytes")
        chunks.append(chunk)
