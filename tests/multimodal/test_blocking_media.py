"""The offline Engine's image loading (blocking_media): in-process images
taken as given under the caps, every string through the server's loader and
policy, refusals naming the field with the server's text."""

import asyncio
import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pyvlm.multimodal.blocking_media import load_images_blocking, load_refs_blocking
from pyvlm.multimodal.media import MediaError, MediaPolicy, load_images

rng = np.random.default_rng()


def random_pixels(height=9, width=13):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_pil_images_bytes_data_uris_and_allowed_paths_give_the_same_pixels(tmp_path):
    pixels = random_pixels()
    data = png_bytes(pixels)
    (tmp_path / "x.png").write_bytes(data)
    sources = [Image.fromarray(pixels), data, bytearray(data), memoryview(data),
               "data:image/png;base64," + base64.b64encode(data).decode(),
               str(tmp_path / "x.png"), tmp_path / "x.png", f"file://{tmp_path}/x.png"]
    images = load_images_blocking(sources, MediaPolicy(allowed_local_media_path=str(tmp_path)))
    for image in images:
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), pixels)


def test_in_process_images_are_converted_to_rgb_under_the_pixel_cap():
    gray = Image.fromarray(random_pixels(4, 5)[..., 0])
    [rgb] = load_images_blocking([gray], MediaPolicy())
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 2], np.asarray(gray))
    with pytest.raises(MediaError, match=r"^image_data\[1\]: image is 13x9 = 117 pixels, more "
                                         "than the limit of 116$"):
        load_images_blocking([gray, Image.new("RGB", (13, 9))], MediaPolicy(max_pixels=116))


def test_byte_caps_hold_for_bytes_and_data_uris():
    data = png_bytes(random_pixels(30, 30))
    policy = MediaPolicy(max_bytes=len(data) - 1)
    with pytest.raises(MediaError, match=f"image is {len(data)} bytes, more than the limit"):
        load_images_blocking([data], policy)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    with pytest.raises(MediaError, match="larger than the limit"):
        load_images_blocking([uri], MediaPolicy(max_bytes=len(data) // 2))


def test_other_objects_are_refused_naming_what_is_accepted():
    with pytest.raises(MediaError, match=r"image_data\[0\]: unsupported image source type int"):
        load_images_blocking([3], MediaPolicy())


def server_message(source, policy) -> str:
    ref = SimpleNamespace(source=source, param="p")
    with pytest.raises(MediaError) as info:
        asyncio.run(load_images([ref], policy))
    return info.value.message


@pytest.mark.parametrize("source", ["http://127.0.0.1:9/x.png", "http://[::1]/x.png",
                                    "http://10.1.2.3/x.png", "/etc/passwd", "../x.png",
                                    "file:///etc/passwd", "htp:/x.png", "",
                                    "data:image/png;base64,!!!", "data:text/plain,hello"])
def test_refusals_name_the_field_with_the_servers_text(tmp_path, source):
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path))
    field = "messages[2].content[1].image_url"
    ref = SimpleNamespace(source=source, param=field)
    with pytest.raises(MediaError) as info:
        load_refs_blocking([SimpleNamespace(source=Image.new("RGB", (2, 2)), param="a"), ref],
                           policy)
    assert str(info.value) == f"{field}: {server_message(source, policy)}"
    assert info.value.param == field


def test_it_loads_from_inside_a_running_event_loop():
    pixels = random_pixels()
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode()

    async def inside():
        return load_images_blocking([uri], MediaPolicy())

    [image] = asyncio.run(inside())
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_one_local_source_is_decoded_on_the_calling_thread(monkeypatch, tmp_path):
    """The one-image request with a data URI or path (the common case) needs
    no event loop or executor thread; several sources still load together."""
    from pyvlm.multimodal import blocking_media

    pixels = random_pixels()
    data = png_bytes(pixels)
    (tmp_path / "x.png").write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path))
    real_run_blocking = blocking_media.run_blocking
    runs = []
    monkeypatch.setattr(blocking_media, "run_blocking",
                        lambda coroutine: runs.append(1) or real_run_blocking(coroutine))
    for source in (uri, str(tmp_path / "x.png")):
        [image] = load_images_blocking([source], policy)
        np.testing.assert_array_equal(np.asarray(image), pixels)
    assert runs == []
    assert len(load_images_blocking([uri, str(tmp_path / "x.png")], policy)) == 2
    assert runs == [1]

