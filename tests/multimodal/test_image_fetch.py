"""Fetching images over HTTP from a local server: redirects, byte cap, timeout."""

import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from pyvlm.multimodal.image_io import ImageError, ImageLimits, load_image

PIXELS = np.random.default_rng().integers(0, 256, (12, 20, 3), dtype=np.uint8)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(PIXELS).save(buffer, "PNG")
    return buffer.getvalue()


class Handler(BaseHTTPRequestHandler):
    """/img: a PNG; /redirect/N: N redirects then /img; /big, /big-chunked:
    a body over any small cap; /slow: a body dripped too slowly; else 404."""

    def do_GET(self):
        if self.path == "/img":
            return self.send_body(png_bytes())
        if self.path.startswith("/redirect/"):
            remaining = int(self.path.rsplit("/", 1)[1])
            return self.redirect("/img" if remaining == 0 else f"/redirect/{remaining - 1}")
        if self.path == "/to-file":
            return self.redirect("file:///etc/passwd")
        if self.path == "/big":
            return self.send_body(bytes(200_000))
        if self.path == "/big-chunked":
            return self.send_unsized(bytes(200_000))
        if self.path == "/slow":
            return self.drip(png_bytes())
        self.send_error(404)

    def redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_body(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")  # the type must not matter
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_unsized(self, body):
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def drip(self, body):
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        for byte in body[:40]:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.05)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def base_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_image_decodes(base_url):
    assert np.array_equal(np.asarray(load_image(base_url + "/img")), PIXELS)


def test_at_most_three_redirects(base_url):
    assert np.array_equal(np.asarray(load_image(base_url + "/redirect/2")), PIXELS)  # 3 hops
    with pytest.raises(ImageError, match="redirect refused"):
        load_image(base_url + "/redirect/3")  # 4 hops
    with pytest.raises(ImageError, match="redirect"):
        load_image(base_url + "/redirect/0", ImageLimits(max_redirects=0))
    with pytest.raises(ImageError, match="redirect"):
        load_image(base_url + "/to-file")


def test_byte_cap_while_reading(base_url):
    limits = ImageLimits(max_bytes=100_000)
    with pytest.raises(ImageError, match="bytes"):
        load_image(base_url + "/big", limits)  # refused from Content-Length
    with pytest.raises(ImageError, match="larger than the limit"):
        load_image(base_url + "/big-chunked", limits)  # refused while reading


def test_total_timeout(base_url):
    start = time.monotonic()
    with pytest.raises(ImageError, match="timed out"):
        load_image(base_url + "/slow", ImageLimits(timeout_s=0.5))
    assert time.monotonic() - start < 1.5


def test_http_errors_and_disallowed_urls(base_url):
    with pytest.raises(ImageError, match="HTTP 404"):
        load_image(base_url + "/missing")
    with pytest.raises(ImageError, match="not allowed"):
        load_image(base_url + "/img", ImageLimits(allow_urls=False))
    with pytest.raises(ImageError, match="failed"):
        load_image("http://127.0.0.1:1/img", ImageLimits(timeout_s=1.0))


@pytest.mark.parametrize("source", ["htp:/tmp/x.png", "htps://example.com/x.png",
                                    "file:///tmp/x.png", "ftp://example.com/x.png"])
def test_offline_sources_with_another_scheme_are_not_read_as_paths(source):
    with pytest.raises(ImageError) as info:
        load_image(source)
    scheme = source.split(":", 1)[0]
    assert f"'{scheme}:' is not a supported URL scheme" in str(info.value)
    assert "cannot read image file" not in str(info.value) and "local file path" in str(info.value)


def test_offline_data_uri_scheme_is_case_insensitive():
    pixels = np.random.default_rng().integers(0, 256, (6, 5, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    uri = "DATA:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    np.testing.assert_array_equal(np.asarray(load_image(uri)), pixels)
