"""What a request image's source string is, and the errors and limits of
loading one (no torch, no I/O).

A source is an http(s) URL, a data URI, a file:// URL or a local path; its
scheme decides which (RFC 3986 syntax, case-insensitive), so a mistyped
"htp:" is refused as an unsupported scheme rather than read as a path. The
fetching itself is pyvlm.multimodal.media's (under a MediaPolicy: SSRF
checks, the allowed local directory); data URI payloads are decoded here,
strictly and under a byte cap.
"""

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Optional

_DATA_URI = re.compile(r"data:(image/[A-Za-z0-9.+-]+)((?:;[^;,]*)*);base64,(.*)", re.DOTALL)
# RFC 3986 §3.1 scheme syntax. §4.2: a relative path's first segment cannot
# hold a colon (write "./a:b"), so "htp:/x" is a URL with a mistyped scheme.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31}):")


class ImageError(ValueError):
    """An image could not be read or decoded; the message says why (client-safe)."""


@dataclass(frozen=True)
class ImageLimits:
    """What decoding one image may cost: max_bytes caps the encoded size
    (data URI payload, bytes given in-process), max_pixels width * height,
    checked from the header before decoding (decompression bombs)."""

    max_bytes: int = 32 << 20
    max_pixels: int = 64_000_000


DEFAULT_LIMITS = ImageLimits()


def url_scheme(source: str) -> Optional[str]:
    """The lowercased URL scheme `source` starts with, or None for a plain path."""
    match = _SCHEME.match(source)
    return match.group(1).lower() if match else None


def unsupported_scheme(scheme: str, supported: str) -> ImageError:
    """The refusal of an image URL whose scheme is none of `supported`."""
    return ImageError(f"image URL scheme '{scheme}:' is not a supported URL scheme "
                      f"(supported: {supported})")


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """The payload of a `data:image/...;base64,` URI; base64 is checked strictly
    (no characters outside the alphabet, correct padding)."""
    match = _DATA_URI.fullmatch(uri)
    if match is None:
        raise ImageError("data URI must look like data:image/<type>;base64,<payload>")
    payload = match.group(3)
    # The decoded size, from the length (padding holds no bytes), before decoding.
    if len(payload) // 4 * 3 - payload[-2:].count("=") > max_bytes:
        raise ImageError(f"data URI payload is larger than the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"data URI payload is not valid base64: {exc}") from None
