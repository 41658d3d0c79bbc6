"""Images for the load tools, as data URIs: the shared real photos (a JPEG
cat and dog, a JPEG named .png, a large RGBA PNG logo) when this checkout
can see them, and small generated pictures of random sizes and formats."""

import base64
import io
import random
from pathlib import Path
from typing import List, Optional, Tuple

REPO = Path(__file__).resolve().parents[2]
PHOTO_FOLDERS = (REPO.parent / "shared" / "data" / "images", REPO / "shared" / "data" / "images")
PHOTO_NAMES = ("cat.jpeg", "dog.jpeg", "example_image.png", "logo.png")


def data_uri(data: bytes) -> str:
    """A data URI whose media type comes from the bytes, not the file name."""
    mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def photo_uris(folder: Optional[Path] = None) -> List[str]:
    """The photos of folder (default: the shared photos, in PHOTO_NAMES
    order) as data URIs; an empty list when there are none."""
    return [data_uri(path.read_bytes()) for path in _photo_paths(folder)]


def generated_uris(rng: random.Random, count: int) -> List[str]:
    """count small pictures (noise over a colour), 16-200 px a side, PNG or
    JPEG, RGB or RGBA: distinct content, so each misses the encoder cache."""
    from PIL import Image

    uris = []
    for _ in range(count):
        width, height = rng.randint(16, 200), rng.randint(16, 200)
        mode, fmt = rng.choice([("RGB", "PNG"), ("RGBA", "PNG"), ("RGB", "JPEG")])
        image = Image.frombytes(mode, (width, height), rng.randbytes(width * height * len(mode)))
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        uris.append(data_uri(buf.getvalue()))
    return uris


def distinct_pictures(count: int, size: Tuple[int, int], folder: Optional[Path] = None) -> list:
    """count RGB PIL images of exactly size (width, height), no two alike:
    crops of 3/4 of each side of the photos of folder (default: the shared
    photos), taken in turn, the crop box moved on a 2-pixel grid at each use
    of a photo, resized to size; noise pictures when there are no photos."""
    from PIL import Image

    photos = [Image.open(path).convert("RGB") for path in _photo_paths(folder)]
    if not photos:
        rng = random.Random(0)
        return [Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
                for _ in range(count)]
    pictures = []
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = photo.size
        left, top = _crop_offset(index // len(photos), width // 4, height // 4)
        box = (left, top, left + width * 3 // 4, top + height * 3 // 4)
        pictures.append(photo.crop(box).resize(size, Image.BICUBIC))
    return pictures


def _crop_offset(use: int, max_left: int, max_top: int) -> Tuple[int, int]:
    """The use-th point of a 2-pixel grid over [0, max_left] x [0, max_top]."""
    columns = max_left // 2 + 1
    left, top = 2 * (use % columns), 2 * (use // columns)
    if top > max_top:
        raise ValueError(f"a {4 * max_left}x{4 * max_top} photo has only "
                         f"{columns * (max_top // 2 + 1)} distinct crops")
    return left, top


def _photo_paths(folder: Optional[Path]) -> List[Path]:
    if folder is not None:
        return sorted(p for p in Path(folder).iterdir()
                      if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for shared in PHOTO_FOLDERS:
        found = [shared / name for name in PHOTO_NAMES if (shared / name).exists()]
        if found:
            return found
    return []
