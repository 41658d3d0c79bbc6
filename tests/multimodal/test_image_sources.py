"""Image source strings: URL schemes (a mistyped one is never a path) and
strict data URIs under a byte cap."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from pyvlm.multimodal.image_sources import ImageError, decode_data_uri, url_scheme

rng = np.random.default_rng()


def png_bytes(height=5, width=7) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("source, scheme", [
    ("http://h/x.png", "http"), ("HTTPS://h/x.png", "https"), ("DATA:image/png;base64,", "data"),
    ("file:///x.png", "file"), ("htp:/tmp/x.png", "htp"), ("c+d.e-f:x", "c+d.e-f"),
    ("/tmp/x.png", None), ("./a:b.png", None), ("x.png", None), ("1http://h", None),
])
def test_the_scheme_is_rfc_3986_syntax_lowercased(source, scheme):
    assert url_scheme(source) == scheme


@pytest.mark.parametrize("num_extra_bytes", [0, 1, 2])  # each base64 padding length
def test_data_uri_gives_its_exact_payload_whatever_the_declared_type(num_extra_bytes):
    data = png_bytes() + bytes(num_extra_bytes)  # trailing bytes after IEND do not matter here
    assert decode_data_uri(data_uri(data), len(data)) == data  # exactly at the cap
    assert decode_data_uri(data_uri(data, "image/jpeg"), len(data)) == data
    with pytest.raises(ImageError, match="larger than the limit"):
        decode_data_uri(data_uri(data), len(data) - 1)


@pytest.mark.parametrize("mutate", [
    lambda uri: uri[:-2] + "!!",  # characters outside the alphabet
    lambda uri: uri[:-1] if uri.endswith("=") else uri + "=",  # wrong padding
    lambda uri: uri[:40] + "\n" + uri[40:],  # whitespace is not base64
    lambda uri: uri.replace(";base64", ""),  # not base64-encoded
    lambda uri: uri.replace("image/png", "text/plain"),  # not an image
])
def test_bad_data_uris_are_refused(mutate):
    with pytest.raises(ImageError, match="data URI"):
        decode_data_uri(mutate(data_uri(png_bytes())), 1 << 20)


def test_data_uri_over_the_byte_cap_is_refused_before_decoding():
    data = png_bytes(30, 30)
    with pytest.raises(ImageError, match="larger than the limit"):
        decode_data_uri(data_uri(data), len(data) // 2)
