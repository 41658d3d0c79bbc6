"""load_images for local paths, file:// URLs and data URIs: the allowed-directory
policy (.., symlinks, percent-encoding), strict base64, errors and dedup."""

import asyncio
import base64
import io
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pyvlm.multimodal.media import MediaError, MediaPolicy, load_images


def random_png(path):
    pixels = np.random.default_rng().integers(0, 256, (9, 13, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "PNG")
    return pixels


@pytest.fixture
def media(tmp_path):
    """allowed/ with an image, a subdirectory and symlinks; secret.png outside."""
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    files = SimpleNamespace(root=tmp_path, allowed=allowed)
    files.inside = random_png(allowed / "sub" / "in side.png")
    files.secret = random_png(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", allowed / "escape.png")
    os.symlink(tmp_path, allowed / "up")
    os.symlink(allowed / "sub" / "in side.png", allowed / "alias.png")
    files.policy = MediaPolicy(allowed_local_media_path=str(allowed))
    return files


def load(sources, policy):
    refs = [SimpleNamespace(source=source, param=f"messages[1].content[{index}].image_url")
            for index, source in enumerate(sources)]
    return asyncio.run(load_images(refs, policy))


def refused(sources, policy) -> MediaError:
    with pytest.raises(MediaError) as info:
        load(sources, policy)
    return info.value


def test_allowed_paths_and_file_urls_load(media):
    sources = [str(media.allowed / "sub" / "in side.png"), "sub/in side.png",
               f"file://{media.allowed}/sub/in%20side.png", f"FILE://localhost{media.allowed}/sub/in side.png",
               str(media.allowed / "alias.png"), f"{media.allowed}/sub/../sub/in side.png"]
    for image in load(sources, media.policy):
        np.testing.assert_array_equal(np.asarray(image), media.inside)


def test_paths_outside_are_refused_after_resolution(media):
    allowed = media.allowed
    escapes = [str(media.root / "secret.png"), f"{allowed}/../secret.png", "../secret.png",
               str(allowed / "escape.png"), str(allowed / "up" / "secret.png"),
               f"file://{allowed}/%2e%2e/secret.png", f"file://{allowed}/%2E%2E%2Fsecret.png",
               f"file://{allowed}/up/secret.png", f"file://{allowed}/..%2fsecret.png",
               str(allowed / "sub"), str(allowed / "missing.png"), "sub/in side.png\x00.png"]
    for source in escapes:
        error = refused([source], media.policy)
        assert error.message == ("local image path is not a readable file inside the allowed "
                                 "media directory (--allowed-local-media-path)"), source
        assert error.param == "messages[1].content[0].image_url"


def test_a_prefix_sibling_directory_is_outside(media):
    sibling = media.root / "allowed-other"
    sibling.mkdir()
    random_png(sibling / "x.png")
    assert "inside the allowed" in refused([str(sibling / "x.png")], media.policy).message


def test_file_urls_with_a_remote_host_are_refused(media):
    error = refused([f"file://evil.example{media.allowed}/sub/in%20side.png"], media.policy)
    assert "file:///absolute/path" in error.message


def test_local_paths_are_refused_without_an_allowed_directory_naming_the_flag(media):
    # A file URL with a host is refused for the missing flag first, not for its host.
    for source in [str(media.allowed / "sub" / "in side.png"), f"file://{media.allowed}/alias.png",
                   "sub/in side.png", f"FILE://evil.example{media.allowed}/alias.png"]:
        message = refused([source], MediaPolicy()).message
        assert "not allowed" in message and "--allowed-local-media-path" in message, source


@pytest.mark.parametrize("prefix", ["htp:/", "htp://", "HTPS://", "htttp://", "ftp://",
                                    "gopher://", "ws://", "C:/", "s3://", "blob:"])
def test_a_mistyped_or_other_scheme_is_not_a_local_path(media, prefix):
    # RFC 3986 §4.2: a colon in a path's first segment makes it a scheme.
    source = prefix + str(media.allowed / "sub" / "in side.png").lstrip("/")
    message = refused([source], media.policy).message
    scheme = prefix.split(":", 1)[0].lower()
    assert f"'{scheme}:' is not a supported URL scheme" in message, message
    for supported in ("http://", "https://", "data:image/", "file://", "--allowed-local-media-path"):
        assert supported in message
    assert "local image path" not in message


def test_a_local_name_with_a_colon_loads_when_written_as_a_relative_path(media):
    pixels = random_png(media.allowed / "a:b.png")
    [image] = load(["./a:b.png"], media.policy)
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_local_byte_cap(media):
    policy = MediaPolicy(allowed_local_media_path=str(media.allowed), max_bytes=50)
    assert "limit of 50 bytes" in refused(["sub/in side.png"], policy).message


def png_bytes(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_data_uri_decodes_to_the_same_pixels():
    pixels = np.random.default_rng().integers(0, 256, (7, 11, 3), dtype=np.uint8)
    payload = base64.b64encode(png_bytes(pixels)).decode()
    # The declared subtype does not matter (the format is sniffed from the
    # bytes), and the scheme is case-insensitive (RFC 3986 §3.1).
    images = load([f"data:image/png;base64,{payload}", f"data:image/jpeg;base64,{payload}",
                   f"DATA:image/png;base64,{payload}"], MediaPolicy())
    for image in images:
        np.testing.assert_array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize("mangle", [
    lambda p: p[:-1],                       # wrong padding length
    lambda p: p[:10] + "\n" + p[10:],      # whitespace is not base64
    lambda p: p[:10] + "*" + p[10:],       # outside the alphabet
    lambda p: p.replace("+", "-").replace("/", "_") + "-_",  # urlsafe alphabet
])
def test_bad_base64_is_refused(mangle):
    payload = base64.b64encode(png_bytes(np.zeros((5, 5, 3), np.uint8)) + b"\xfb\xff").decode()
    error = refused([f"data:image/png;base64,{payload}", f"data:image/png;base64,{mangle(payload)}"],
                    MediaPolicy())
    assert "base64" in error.message and error.param == "messages[1].content[1].image_url"


@pytest.mark.parametrize("uri", ["data:text/plain;base64,aGVsbG8=", "data:image/png,rawbytes",
                                 "data:image/png;base64,aGVsbG8=", "gopher://x/y.png", "", None])
def test_other_bad_sources_are_refused_with_a_client_safe_message(uri):
    error = refused([uri], MediaPolicy(allowed_local_media_path="/tmp"))
    assert error.param == "messages[1].content[0].image_url"
    assert "Traceback" not in error.message and "Error(" not in error.message


def test_pixel_cap_is_checked_before_decoding():
    payload = base64.b64encode(png_bytes(np.zeros((40, 50, 3), np.uint8))).decode()
    error = refused([f"data:image/png;base64,{payload}"], MediaPolicy(max_pixels=1999))
    assert "2000 pixels" in error.message


def test_repeated_data_uri_is_decoded_once():
    payload = base64.b64encode(png_bytes(np.full((3, 4, 3), 7, np.uint8))).decode()
    uri = f"data:image/png;base64,{payload}"
    first, second, third = load([uri, uri, uri], MediaPolicy())
    assert first is second is third


def test_media_modules_import_without_torch():
    code = ("import sys, pyvlm.multimodal.media, pyvlm.multimodal.address_policy, "
            "pyvlm.multimodal.http_fetch, pyvlm.multimodal.local_media; "
            "assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
