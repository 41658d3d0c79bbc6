"""Decoding request images: every mode to RGB, EXIF orientation, sniffing,
the pixel cap. (Sources, data URIs and byte caps: test_image_sources.py,
test_media_*.py and test_blocking_media.py.)"""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyvlm.multimodal.image_io import ImageError, ImageLimits, check_pixels, decode_image, to_rgb

IMAGES = Path("/work/shared/data/images")
rng = np.random.default_rng()


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def random_pixels(height, width, channels=3):
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """float reference of alpha compositing over white."""
    a = alpha.astype(np.float64)[..., None] / 255
    return color.astype(np.float64) * a + 255 * (1 - a)


def assert_rgb(image: Image.Image, expected: np.ndarray, atol: float = 0):
    assert image.mode == "RGB"
    got = np.asarray(image).astype(np.float64)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= atol


def test_rgb_png_is_lossless():
    pixels = random_pixels(13, 17)
    assert_rgb(decode_image(encode(Image.fromarray(pixels), "PNG")), pixels)


def test_grayscale_and_bilevel_replicate_channels():
    gray = random_pixels(9, 11, channels=1)
    assert_rgb(decode_image(encode(Image.fromarray(gray), "PNG")), np.stack([gray] * 3, -1))
    bits = gray > 127
    expected = np.stack([bits.astype(np.uint8) * 255] * 3, -1)
    assert_rgb(decode_image(encode(Image.fromarray(bits), "PNG")), expected)


def test_rgba_and_la_composite_on_white():
    rgba = random_pixels(8, 10, channels=4)
    assert_rgb(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")),
               on_white(rgba[..., :3], rgba[..., 3]), atol=1)
    la = random_pixels(8, 10, channels=2)
    expected = on_white(np.stack([la[..., 0]] * 3, -1), la[..., 1])
    assert_rgb(decode_image(encode(Image.fromarray(la, "LA"), "PNG")), expected, atol=1)


def test_palette_with_and_without_transparency():
    palette = random_pixels(1, 256)[0]
    indices = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.reshape(-1).tolist())
    assert_rgb(decode_image(encode(image, "PNG")), palette[indices])
    transparent = int(indices[0, 0])
    expected = palette[indices].copy()
    expected[indices == transparent] = 255
    assert_rgb(decode_image(encode(image, "PNG", transparency=transparent)), expected)


def test_cmyk_converts_through_pillow():
    cmyk = random_pixels(5, 6, channels=4)
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected = (255 - c) * (255 - k) / 255
    assert_rgb(decode_image(encode(Image.fromarray(cmyk, "CMYK"), "TIFF")), expected, atol=1)


def test_16_bit_grayscale_is_scaled_not_clipped():
    values = rng.integers(0, 65536, (7, 9), dtype=np.uint16)
    decoded_source = Image.open(io.BytesIO(encode(Image.fromarray(values), "PNG")))
    assert decoded_source.mode.startswith("I")
    expected = np.round(values.astype(np.float64) * 255 / 65535)
    assert_rgb(decode_image(encode(Image.fromarray(values), "PNG")), np.stack([expected] * 3, -1))


def test_animation_gives_first_frame():
    first, second = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert_rgb(decode_image(data), np.full((4, 4, 3), (255, 0, 0)), atol=2)


@pytest.mark.parametrize("orientation,quarter_turns", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(orientation, quarter_turns):
    pixels = np.zeros((32, 48, 3), dtype=np.uint8)
    pixels[:16, :24] = (255, 0, 0)  # red top-left block marks the rotation
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert_rgb(decode_image(data), np.rot90(stored, k=quarter_turns).astype(np.float64))


def test_format_is_sniffed_from_bytes_not_the_name():
    path = IMAGES / "example_image.png"  # really a JPEG
    image = decode_image(path.read_bytes())
    assert (image.mode, image.size) == ("RGB", Image.open(path).size)
    assert image.tobytes() == Image.open(path).convert("RGB").tobytes()


def test_real_rgba_logo_composited_on_white():
    source = Image.open(IMAGES / "logo.png")
    assert source.mode == "RGBA"
    rgba = np.asarray(source)
    expected = on_white(rgba[..., :3], rgba[..., 3])
    assert_rgb(decode_image((IMAGES / "logo.png").read_bytes()), expected, atol=1)


def test_real_photos_decode_to_rgb():
    for name in ("cat.jpeg", "dog.jpeg"):
        image = decode_image((IMAGES / name).read_bytes())
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(IMAGES / name)))


def test_pil_input_is_converted_to_rgb():
    la = random_pixels(4, 5, channels=2)
    expected = on_white(np.stack([la[..., 0]] * 3, -1), la[..., 1])
    assert_rgb(to_rgb(Image.fromarray(la, "LA")), expected, atol=1)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data follows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(bytes(64)))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_pixel_cap_refuses_before_decoding():
    with pytest.raises(ImageError, match="144000000 pixels, more than the limit"):
        decode_image(png_header_only(12_000, 12_000), ImageLimits(max_pixels=10**8))
    with pytest.raises(ImageError, match="too large|pixels"):
        decode_image(png_header_only(100_000, 100_000))  # over Pillow's own bomb limit too
    data = encode(Image.fromarray(random_pixels(20, 30)), "PNG")
    with pytest.raises(ImageError, match="600 pixels, more than the limit of 599"):
        decode_image(data, ImageLimits(max_pixels=599))
    assert decode_image(data, ImageLimits(max_pixels=600)).size == (30, 20)
    with pytest.raises(ImageError, match="600 pixels, more than the limit of 599"):
        check_pixels(30, 20, max_pixels=599)
    with pytest.raises(ImageError, match="no pixels"):
        check_pixels(0, 20, max_pixels=599)


def test_garbage_and_truncated_bytes_are_refused():
    with pytest.raises(ImageError, match="identify"):
        decode_image(b"not an image at all")
    data = encode(Image.fromarray(random_pixels(64, 64)), "JPEG")
    with pytest.raises(ImageError):
        decode_image(data[: len(data) // 2])
