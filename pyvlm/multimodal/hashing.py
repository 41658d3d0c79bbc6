"""Content hashes of images (no torch).

The hash keys the radix prefix cache (placeholder tokens of equal images
share KV) and the encoder cache, so it depends on the decoded pixels only:
two URLs of the same picture hit the cache, one changed pixel misses it.
"""

import hashlib

from PIL import Image

_DIGEST_BYTES = 8  # 64-bit hashes


def image_content_hash(image: Image.Image) -> int:
    """Unsigned 64-bit blake2b of the image's mode, size and raw pixels."""
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return int.from_bytes(digest.digest(), "little")


def combine_hash(content_hash: int, variant: str) -> int:
    """Unsigned 64-bit hash of (content hash, processing variant).

    The same pixels embed differently when processed differently (e.g.
    LLaVA-OneVision's anyres tiles for a lone image, one padded square in a
    multi-image prompt), so the cache key of an image item must include how
    it was processed.
    """
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    digest.update(content_hash.to_bytes(_DIGEST_BYTES, "little"))
    digest.update(variant.encode())
    return int.from_bytes(digest.digest(), "little")
