"""load_images over HTTP against a loopback server: decoding parity, redirects,
byte caps, timeouts, a misleading Content-Type, dedup, concurrency, errors."""

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageOps

from pyvlm.multimodal import address_policy, http_fetch
from pyvlm.multimodal.media import MediaError, MediaPolicy, load_images

from .media_server import BIG_BYTES, IMAGE_DIR, IMAGE_NAMES, MediaServer

LOOPBACK = MediaPolicy(allow_private_urls=True, connect_timeout_s=2, total_timeout_s=5)


@pytest.fixture(scope="module")
def server():
    with MediaServer() as running:
        yield running


def refs(*sources):
    return [SimpleNamespace(source=source, param=f"messages[0].content[{index}].image_url")
            for index, source in enumerate(sources)]


def load(sources, policy=LOOPBACK):
    return asyncio.run(load_images(refs(*sources), policy))


def reference_rgb(name):
    """Pillow directly: EXIF transpose, alpha on white, RGB."""
    image = ImageOps.exif_transpose(Image.open(IMAGE_DIR / name))
    if "A" in image.getbands() or "transparency" in image.info:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, image).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def refused(sources, policy=LOOPBACK) -> MediaError:
    with pytest.raises(MediaError) as info:
        load(sources, policy)
    assert "Traceback" not in info.value.message and "Error(" not in info.value.message
    return info.value


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_url_image_equals_pillow_reference_whatever_the_content_type(server, name):
    [image] = load([f"http://127.0.0.1:{server.port}/images/{name}"])
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), reference_rgb(name))


def test_chunked_body_with_extension_and_trailer_is_decoded(server):
    [image] = load([f"http://127.0.0.1:{server.port}/chunked/dog.jpeg"])
    np.testing.assert_array_equal(np.asarray(image), reference_rgb("dog.jpeg"))


def test_three_redirects_are_followed(server):
    [image] = load([f"http://127.0.0.1:{server.port}/redirect/3/cat.jpeg"])
    np.testing.assert_array_equal(np.asarray(image), reference_rgb("cat.jpeg"))


def test_fourth_redirect_is_refused(server):
    error = refused([f"http://127.0.0.1:{server.port}/redirect/4/cat.jpeg"])
    assert "redirect" in error.message and error.param == "messages[0].content[0].image_url"


def test_redirect_to_a_file_url_is_refused(server):
    target = f"http://127.0.0.1:{server.port}/redirect-to?url=file:///etc/passwd"
    assert "http or https" in refused([target]).message


@pytest.mark.parametrize("route", ["big-length", "big-close", "big-chunked"])
def test_byte_cap_while_streaming(server, route):
    policy = MediaPolicy(allow_private_urls=True, max_bytes=BIG_BYTES // 3, total_timeout_s=5)
    started = time.monotonic()
    error = refused([f"http://127.0.0.1:{server.port}/{route}"], policy)
    assert f"limit of {BIG_BYTES // 3} bytes" in error.message
    assert time.monotonic() - started < 2  # big-length: refused from the header alone


def test_slow_body_hits_the_total_timeout(server):
    policy = MediaPolicy(allow_private_urls=True, total_timeout_s=0.5)
    started = time.monotonic()
    assert "longer than 0.5 s" in refused([f"http://127.0.0.1:{server.port}/slow"], policy).message
    assert time.monotonic() - started < 1.5


def test_server_that_never_answers_hits_the_total_timeout(server):
    policy = MediaPolicy(allow_private_urls=True, total_timeout_s=0.3)
    assert "longer than 0.3 s" in refused([f"http://127.0.0.1:{server.port}/stall"], policy).message


def test_connect_timeout(monkeypatch):
    async def never_connects(*args):
        await asyncio.sleep(10)

    monkeypatch.setattr(http_fetch, "open_tcp", never_connects)
    policy = MediaPolicy(allow_private_urls=True, connect_timeout_s=0.2, total_timeout_s=5)
    started = time.monotonic()
    assert "could not connect" in refused(["http://127.0.0.1:9/x.png"], policy).message
    assert time.monotonic() - started < 1


def test_http_error_status_and_undecodable_body(server):
    assert "HTTP 404" in refused([f"http://127.0.0.1:{server.port}/missing"]).message
    error = refused([f"http://127.0.0.1:{server.port}/images/cat.jpeg",
                     f"http://127.0.0.1:{server.port}/garbage"])
    assert "cannot identify" in error.message
    assert error.param == "messages[0].content[1].image_url"


def test_repeated_source_is_fetched_once_and_order_is_kept(server):
    cat, dog = (f"http://127.0.0.1:{server.port}/images/{name}?dedup" for name in ("cat.jpeg", "dog.jpeg"))
    before = len(server.seen)
    images = load([cat, dog, cat, cat])
    fetched = [path for path, _host in server.seen[before:]]
    assert sorted(fetched) == ["/images/cat.jpeg?dedup", "/images/dog.jpeg?dedup"]
    assert images[0] is images[2] is images[3]
    np.testing.assert_array_equal(np.asarray(images[1]), reference_rgb("dog.jpeg"))


def test_fetches_run_concurrently(server):
    """Two 0.5 s stalls together fail in about one timeout, not two."""
    policy = MediaPolicy(allow_private_urls=True, total_timeout_s=0.5)
    started = time.monotonic()
    refused([f"http://127.0.0.1:{server.port}/stall", f"http://127.0.0.1:{server.port}/stall?2"], policy)
    assert time.monotonic() - started < 0.95


def test_host_header_keeps_the_name_while_connecting_to_the_checked_ip(server, monkeypatch):
    async def resolver(host, port):
        assert host == "images.test"
        return [(2, 1, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(address_policy, "getaddrinfo", resolver)
    load([f"http://images.test:{server.port}/images/cat.jpeg?host"])
    assert ("/images/cat.jpeg?host", f"images.test:{server.port}") in server.seen


def test_cancelling_load_images_cancels_its_fetches(server):
    """A client that disconnects cancels the handler: no fetch may outlive it."""
    async def cancel_midway():
        ref = refs(f"http://127.0.0.1:{server.port}/stall?cancel")
        loading = asyncio.ensure_future(load_images(ref, LOOPBACK))
        await asyncio.sleep(0.2)
        loading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loading
        await asyncio.sleep(0)
        return [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]

    started = time.monotonic()
    assert asyncio.run(cancel_midway()) == []
    assert time.monotonic() - started < 1
