"""Image content hashes depend on the pixels, size and mode only."""

import base64
import io

import numpy as np
from PIL import Image

from pyvlm.multimodal.hashing import combine_hash, image_content_hash
from pyvlm.multimodal.blocking_media import load_images_blocking
from pyvlm.multimodal.media import MediaPolicy

rng = np.random.default_rng()


def random_image(height=24, width=32) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def test_same_pixels_same_hash_whatever_the_source_or_metadata():
    image = random_image()
    encoded = png(image)
    with_metadata = png(image, dpi=(300, 300), compress_level=1)
    assert encoded != with_metadata
    uri = "data:image/png;base64," + base64.b64encode(encoded).decode()
    sources = [image, encoded, with_metadata, uri]
    hashes = {image_content_hash(loaded) for loaded in load_images_blocking(sources, MediaPolicy())}
    assert len(hashes) == 1
    value = hashes.pop()
    assert isinstance(value, int) and 0 <= value < 2 ** 64


def test_one_changed_pixel_changes_the_hash():
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    y, x, c = rng.integers(0, 24), rng.integers(0, 32), rng.integers(0, 3)
    changed = pixels.copy()
    changed[y, x, c] ^= 1
    assert image_content_hash(Image.fromarray(pixels)) != image_content_hash(Image.fromarray(changed))


def test_different_content_same_size_differs():
    hashes = {image_content_hash(random_image()) for _ in range(50)}
    assert len(hashes) == 50


def test_same_bytes_different_size_or_mode_differs():
    flat = rng.integers(0, 256, 4 * 6 * 3, dtype=np.uint8)
    wide = Image.fromarray(flat.reshape(4, 6, 3))
    tall = Image.fromarray(flat.reshape(6, 4, 3))
    assert wide.tobytes() == tall.tobytes()
    assert image_content_hash(wide) != image_content_hash(tall)
    gray = Image.fromarray(flat[:36].reshape(6, 6), "L")
    assert image_content_hash(gray) != image_content_hash(Image.frombytes("P", (6, 6), gray.tobytes()))


def test_combine_hash_separates_processing_variants():
    content = image_content_hash(random_image())
    variants = {combine_hash(content, "anyres"), combine_hash(content, "pad_square")}
    assert len(variants) == 2 and all(0 <= v < 2 ** 64 for v in variants)
    assert combine_hash(content, "anyres") == combine_hash(content, "anyres")
