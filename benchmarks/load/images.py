"""Images for the load tools, as data URIs: the shared real photos (a JPEG
cat and dog, a JPEG named .png, a large RGBA PNG logo) when this checkout
can see them, and small generated pictures of random sizes and formats."""

import base64
import io
import random
from pathlib import Path
from typing import List, Optional

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
    if folder is not None:
        paths = sorted(p for p in Path(folder).iterdir()
                       if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        return [data_uri(path.read_bytes()) for path in paths]
    for shared in PHOTO_FOLDERS:
        found = [shared / name for name in PHOTO_NAMES if (shared / name).exists()]
        if found:
            return [data_uri(path.read_bytes()) for path in found]
    return []


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
