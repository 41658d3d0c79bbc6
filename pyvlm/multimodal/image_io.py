"""Decoding request images into RGB PIL images (no torch).

The format is sniffed from the bytes (never from a file name or a
Content-Type), the size is checked against a pixel cap from the header
before any pixel is decoded, the EXIF orientation is applied, animations
give their first frame, and every mode becomes 8-bit RGB (alpha composited
on white, 16-bit samples scaled rather than clipped). The pixels depend on
the bytes alone, so a decoded image is keyed by its bytes for the caches
(pyvlm.multimodal.hashing).
"""

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from .hashing import keep_encoded_key
from .image_sources import DEFAULT_LIMITS, ImageError, ImageLimits

__all__ = ["ImageError", "ImageLimits", "DEFAULT_LIMITS", "decode_image", "check_pixels", "to_rgb"]

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WIDE_GRAY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decodes encoded image bytes into an upright RGB image (first frame),
    read-only and keyed by data (hashing.keep_encoded_key)."""
    with warnings.catch_warnings():
        # pyvlm's own pixel cap replaces Pillow's global bomb check and warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = _open(data)
        check_pixels(image.width, image.height, limits.max_pixels)
        try:
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageError(f"cannot decode {image.format} image: {exc}") from None
    return keep_encoded_key(to_rgb(image), data)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image is too large: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("cannot identify the image format (not an image, or unsupported)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot read image header: {exc}") from None


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuses images whose width * height exceeds max_pixels (or is zero)."""
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, more than the "
                         f"limit of {max_pixels}")
    if width * height == 0:
        raise ImageError(f"image has no pixels ({width}x{height})")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: alpha (incl. palette transparency) composited on white,
    16-bit grayscale scaled to 8 bits, every other mode through Pillow."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        return _composite_on_white(image.convert("RGBA"))
    if image.mode in _WIDE_GRAY_MODES:
        return _wide_gray_to_rgb(image)
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"cannot convert {image.mode} image to RGB: {exc}") from None


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    """Pillow's convert clips 16-bit samples at 255; scale 0..65535 to 0..255
    with rounding instead (round(v * 255 / 65535))."""
    import numpy as np

    values = np.asarray(image).astype(np.int64).clip(0, 65535)
    gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
