"""Image content keys: a decoded image is keyed by its encoded bytes (the
same bytes from any source: the same key; other bytes: another key), an
image given in-process by its pixels, size and mode; equal keys always
mean equal pixels, also after a decoded image is changed in place."""

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pyvlm.multimodal.hashing import (combine_hash, encoded_bytes_key, image_content_hash,
                                      pixel_key)
from pyvlm.multimodal.blocking_media import load_images_blocking
from pyvlm.multimodal.image_io import decode_image
from pyvlm.multimodal.media import MediaPolicy

rng = np.random.default_rng()


def random_image(height=24, width=32) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_the_same_bytes_from_any_source_get_one_key(tmp_path):
    encoded = png(random_image())
    (tmp_path / "a.png").write_bytes(encoded)
    sources = [encoded, data_uri(encoded), str(tmp_path / "a.png"), (tmp_path / "a.png").as_uri()]
    images = load_images_blocking(sources, MediaPolicy(allowed_local_media_path=str(tmp_path)))
    assert {image_content_hash(image) for image in images} == {encoded_bytes_key(encoded)}
    value = encoded_bytes_key(encoded)
    assert isinstance(value, int) and 0 <= value < 2 ** 64


def test_other_bytes_of_the_same_pixels_get_other_keys_never_a_pixel_key():
    # A miss where the caches could have hit, never a hit on other pixels.
    image = random_image()
    encoded, with_metadata = png(image), png(image, dpi=(300, 300), compress_level=1)
    assert encoded != with_metadata
    loaded = load_images_blocking([image, encoded, with_metadata], MediaPolicy())
    assert all(np.array_equal(np.asarray(im), np.asarray(image)) for im in loaded)
    keys = [image_content_hash(im) for im in loaded]
    assert keys == [pixel_key(image), encoded_bytes_key(encoded), encoded_bytes_key(with_metadata)]
    assert len(set(keys)) == 3


def test_different_images_of_one_size_get_different_keys():
    encoded = [png(random_image()) for _ in range(50)]
    assert len({image_content_hash(decode_image(data)) for data in encoded}) == 50
    assert len({image_content_hash(random_image()) for _ in range(50)}) == 50


def test_one_changed_pixel_changes_the_pixel_key():
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    y, x, c = rng.integers(0, 24), rng.integers(0, 32), rng.integers(0, 3)
    changed = pixels.copy()
    changed[y, x, c] ^= 1
    assert image_content_hash(Image.fromarray(pixels)) != image_content_hash(Image.fromarray(changed))


def test_same_bytes_different_size_or_mode_differs():
    flat = rng.integers(0, 256, 4 * 6 * 3, dtype=np.uint8)
    wide = Image.fromarray(flat.reshape(4, 6, 3))
    tall = Image.fromarray(flat.reshape(6, 4, 3))
    assert wide.tobytes() == tall.tobytes()
    assert image_content_hash(wide) != image_content_hash(tall)
    gray = Image.fromarray(flat[:36].reshape(6, 6), "L")
    assert image_content_hash(gray) != image_content_hash(Image.frombytes("P", (6, 6), gray.tobytes()))


@pytest.mark.parametrize("change", [
    lambda im: im.paste((0, 0, 0), (0, 0, 4, 4)),
    lambda im: im.putpixel((1, 1), (1, 2, 3)),
    lambda im: ImageDraw.Draw(im).line((0, 0, 10, 10), fill=(255, 0, 0)),
    lambda im: im.thumbnail((8, 8)),
])
def test_a_decoded_image_changed_in_place_is_keyed_by_its_new_pixels(change):
    image = decode_image(png(random_image()))
    before = np.asarray(image).copy()
    change(image)
    assert not np.array_equal(np.asarray(image), before)
    assert image_content_hash(image) == pixel_key(image)


def test_a_decoded_image_is_read_only_and_its_copies_are_keyed_by_pixels():
    image = decode_image(png(random_image()))
    with pytest.raises(ValueError, match="read"):
        image.load()[0, 0] = (1, 2, 3)
    for other in (image.copy(), image.crop((0, 0, 8, 8)), image.convert("RGB")):
        assert image_content_hash(other) == pixel_key(other)


def test_pixel_and_encoded_keys_are_hashed_apart():
    # The bytes a pixel key hashes, given as if they were encoded bytes.
    image = random_image(4, 4)
    assert encoded_bytes_key(image.tobytes()) != pixel_key(image)


def test_combine_hash_separates_processing_variants():
    content = image_content_hash(random_image())
    variants = {combine_hash(content, "anyres"), combine_hash(content, "pad_square")}
    assert len(variants) == 2 and all(0 <= v < 2 ** 64 for v in variants)
    assert combine_hash(content, "anyres") == combine_hash(content, "anyres")
