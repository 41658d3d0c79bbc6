"""The images the offline Engine is given, loaded under the server's media
policy from a plain thread (no torch).

pyvlm.Engine takes PIL images and encoded bytes as they are (nothing is
fetched; only the pixel and byte caps apply), and URLs, data URIs, file://
URLs and paths (image_data, or the image parts of chat messages) through
pyvlm.multimodal.media with the same MediaPolicy as the server: URLs to
private or loopback addresses are refused unless allow_private_urls, and
local files are read only under allowed_local_media_path.
"""

import asyncio
import concurrent.futures
import os
from dataclasses import dataclass
from typing import Any, List, Sequence

from PIL import Image

from .image_sources import ImageError
from .image_io import check_pixels, decode_image, to_rgb
from .media import MediaError, MediaPolicy, is_network_source, load_images, load_local_image


@dataclass(frozen=True)
class _Ref:
    source: Any
    param: str


def load_images_blocking(sources: Sequence[Any], policy: MediaPolicy,
                         param: str = "image_data") -> List[Image.Image]:
    """RGB images for sources (PIL images, bytes, str/os.PathLike URLs or
    paths), in order. Raises MediaError (a ValueError) whose message names
    the failing source as param[i]."""
    return load_refs_blocking([_Ref(source, f"{param}[{index}]")
                               for index, source in enumerate(sources)], policy)


def load_refs_blocking(refs: Sequence[Any], policy: MediaPolicy) -> List[Image.Image]:
    """RGB images for image references (each with a .source as above and a
    .param, the field it came from: pyvlm.chat's ImageRef fits), in order.
    A refusal is a MediaError naming the reference: "param: <what the
    server answers for the same source>", with .param set."""
    images: List[Any] = [None] * len(refs)
    fetched = []
    for index, ref in enumerate(refs):
        if isinstance(ref.source, (str, os.PathLike)):
            fetched.append((index, _Ref(os.fspath(ref.source), ref.param)))
        else:
            images[index] = _decoded(ref.source, policy, ref.param)
    try:
        if len(fetched) == 1 and not is_network_source(fetched[0][1].source):
            # The common one-image request (a data URI or a path): decoded
            # here, without an event loop and an executor thread of its own.
            index, ref = fetched[0]
            images[index] = load_local_image(ref.source, policy, ref.param)
        elif fetched:
            loaded = run_blocking(load_images([ref for _, ref in fetched], policy))
            for (index, _), image in zip(fetched, loaded):
                images[index] = image
    except MediaError as exc:
        raise _named(exc.message, exc.param) from None
    return images


def _named(message: str, param: str) -> MediaError:
    return MediaError(f"{param}: {message}", param)


def _decoded(source: Any, policy: MediaPolicy, name: str) -> Image.Image:
    try:
        if isinstance(source, Image.Image):
            check_pixels(source.width, source.height, policy.max_pixels)
            return to_rgb(source)
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) > policy.max_bytes:
                raise ImageError(f"image is {len(source)} bytes, more than the limit of "
                                 f"{policy.max_bytes}")
            return decode_image(bytes(source), policy.image_limits)
        raise ImageError(f"unsupported image source type {type(source).__name__} (give a PIL "
                         "image, bytes, a URL, a data URI or a path)")
    except ImageError as exc:
        raise _named(str(exc), name) from None


def run_blocking(coroutine):
    """Runs a coroutine to completion from synchronous code, also when this
    thread already runs an event loop (then on a short-lived thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
