"""Loading a request's images for the server, asynchronously and safely (no torch).

`load_images` takes the image references a chat template found (each with a
`.source`, a URL / data URI / path, and a `.param`, the request field it came
from) and returns RGB PIL images in the same order. Every distinct source is
fetched once and concurrently: http(s) URLs on the event loop through
http_fetch (SSRF checks, timeouts, redirects, byte cap), data URIs with strict
base64, local paths and file:// URLs only under the allowed directory; any
other scheme (a mistyped "htp:" too) is refused as unsupported, never read as
a path. Each refusal that a flag would lift names that flag.
Decoding (and anything else that blocks) runs in the default executor, so
the event loop keeps serving other requests. Failures raise MediaError whose
message is safe to send to the client and whose `param` names the part;
the server answers them with HTTP 422.
"""

import asyncio
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

from PIL import Image

from .http_fetch import FetchError, FetchLimits, fetch_url
from .image_sources import ImageError, ImageLimits, decode_data_uri, unsupported_scheme, url_scheme
from .image_io import decode_image
from .local_media import LocalMediaError, path_from_file_url, read_allowed, require_allowed_dir

__all__ = ["MediaPolicy", "MediaError", "ImageRefLike", "load_images", "load_image_source",
           "SERVER_SOURCES"]

SERVER_SOURCES = ("http://, https://, data:image/<type>;base64,<payload>, and file:// URLs or "
                  "local paths when the server runs with --allowed-local-media-path")
_CLIENT_ERRORS = (ImageError, FetchError, LocalMediaError)


@dataclass(frozen=True)
class MediaPolicy:
    """What a request's images may reach and cost (plain data, built from CLI flags).

    allowed_local_media_path: the only directory local paths and file:// URLs
    may read from (None: none allowed). allow_private_urls: also fetch URLs on
    loopback/private/link-local and other non-public addresses. max_bytes caps
    each encoded image, max_pixels its width * height (checked before
    decoding). The timeouts bound connecting and the whole fetch of one URL
    including its at most max_redirects redirects.
    """

    allowed_local_media_path: Optional[str] = None
    allow_private_urls: bool = False
    max_bytes: int = 32 << 20
    max_pixels: int = 64_000_000
    connect_timeout_s: float = 5.0
    total_timeout_s: float = 20.0
    max_redirects: int = 3

    @property
    def fetch_limits(self) -> FetchLimits:
        return FetchLimits(self.max_bytes, self.connect_timeout_s, self.total_timeout_s,
                           self.max_redirects, self.allow_private_urls)

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_bytes, max_pixels=self.max_pixels)


class MediaError(ValueError):
    """An image that cannot be fetched or decoded (HTTP 422).

    `param` is the request field it came from (e.g.
    "messages[1].content[0].image_url"); the message holds no repr or traceback.
    """

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.param = param


class ImageRefLike(Protocol):
    """What load_images needs of an image reference (pyvlm.chat's ImageRef fits)."""

    source: str
    param: str


async def load_images(refs: Sequence[ImageRefLike], policy: MediaPolicy) -> list:
    """RGB PIL images for `refs`, in order; a source repeated in one request is
    fetched and decoded once (the same image object is returned for each).
    On the first failure the other fetches are cancelled and MediaError is
    raised for the earliest failing reference."""
    first_param = {}
    for ref in refs:
        first_param.setdefault(_source_key(ref), ref.param)
    tasks = {key: asyncio.ensure_future(load_image_source(key, policy)) for key in first_param}
    try:
        await _wait_for_all_or_first_error(list(tasks.values()))
        _raise_first_failure(tasks, first_param)
        return [tasks[_source_key(ref)].result() for ref in refs]
    finally:
        _cancel_and_reap(tasks.values())


def _source_key(ref: ImageRefLike):
    # A non-string source is kept as is so load_image_source reports it.
    return ref.source if isinstance(ref.source, str) else _Unhashable(ref.source)


class _Unhashable:
    """Wraps a malformed (possibly unhashable) source; never equal to another."""

    def __init__(self, value):
        self.value = value


async def _wait_for_all_or_first_error(tasks: list) -> None:
    if tasks:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)


def _raise_first_failure(tasks: dict, first_param: dict) -> None:
    for key, task in tasks.items():  # dicts keep request order
        if task.done() and not task.cancelled() and task.exception() is not None:
            error = task.exception()
            if isinstance(error, _CLIENT_ERRORS):
                raise MediaError(str(error), first_param[key]) from None
            raise error


def _cancel_and_reap(tasks) -> None:
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # marks it retrieved: no "never retrieved" log noise
        task.cancel()


async def load_image_source(source, policy: MediaPolicy) -> Image.Image:
    """One RGB image from a URL, data URI, file:// URL or local path.
    Raises ImageError, FetchError or LocalMediaError (client-safe messages)."""
    if isinstance(source, _Unhashable) or not isinstance(source, str) or not source:
        raise ImageError("image URL must be a non-empty string")
    if url_scheme(source) in ("http", "https"):
        data = await fetch_url(source, policy.fetch_limits)
        return await _off_loop(decode_image, data, policy.image_limits)
    return await _off_loop(_read_and_decode, source, policy)


def is_network_source(source) -> bool:
    """Whether loading source needs the network (an http(s) URL)."""
    return isinstance(source, str) and url_scheme(source) in ("http", "https")


def load_local_image(source: str, policy: MediaPolicy, param: str) -> Image.Image:
    """Blocking load_image_source for a source that needs no network (a data
    URI, file:// URL or local path), on the calling thread; a refusal is a
    MediaError for param, as load_images raises it."""
    if not isinstance(source, str) or not source:
        raise MediaError("image URL must be a non-empty string", param)
    try:
        return _read_and_decode(source, policy)
    except _CLIENT_ERRORS as exc:
        raise MediaError(str(exc), param) from None


def _read_and_decode(source: str, policy: MediaPolicy) -> Image.Image:
    """Blocking: the bytes of a data URI or local file, decoded."""
    return decode_image(_read_non_url(source, policy), policy.image_limits)


def _read_non_url(source: str, policy: MediaPolicy) -> bytes:
    scheme = url_scheme(source)
    if scheme == "data":
        return decode_data_uri("data:" + source[5:], policy.max_bytes)
    if scheme not in ("file", None):
        raise unsupported_scheme(scheme, SERVER_SOURCES)
    # The flag is checked first, so a refusal always names it.
    require_allowed_dir(policy.allowed_local_media_path)
    path = source if scheme is None else path_from_file_url(source)
    return read_allowed(path, policy.allowed_local_media_path, policy.max_bytes)


async def _off_loop(function, *args):
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, function, *args)
