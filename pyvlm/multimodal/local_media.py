"""Reading request images from the server's disk, only inside one directory (no torch).

A request may name a local path or a file:// URL only when the server was
started with an allowed media directory. The path is percent-decoded (file
URLs), made absolute against that directory, resolved with every symlink
followed, and must then lie inside the resolved directory: the check is on
the real file, never on the string, so "..", "%2e%2e" and symlinks pointing
outside are all refused. Missing files and refused files get the same answer,
so a client cannot probe which files exist elsewhere.
"""

import os
import stat
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit


class LocalMediaError(ValueError):
    """A local image path that is not allowed or cannot be read (client-safe message)."""


_NOT_ALLOWED = ("local image paths and file:// URLs are not allowed on this server (start it "
                "with --allowed-local-media-path DIR to allow the files under DIR)")
_NOT_FOUND = ("local image path is not a readable file inside the allowed media directory "
              "(--allowed-local-media-path)")


def require_allowed_dir(allowed_dir: Optional[str]) -> None:
    """Refuses every local path when the server has no allowed media directory."""
    if allowed_dir is None:
        raise LocalMediaError(_NOT_ALLOWED)


def path_from_file_url(url: str) -> str:
    """The percent-decoded path of a file:// URL; only an empty or "localhost" host."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise LocalMediaError("file URLs must look like file:///absolute/path")
    return unquote(parts.path)


def resolve_allowed(path: str, allowed_dir: Optional[str]) -> Path:
    """The real path of `path` (relative paths are taken inside allowed_dir),
    refused unless it is an existing regular file under allowed_dir."""
    require_allowed_dir(allowed_dir)
    try:
        root = Path(allowed_dir).resolve(strict=True)
        real = (root / path).resolve(strict=True)
    except (OSError, ValueError, RuntimeError):  # missing, NUL byte, symlink loop
        raise LocalMediaError(_NOT_FOUND) from None
    if not real.is_relative_to(root) or not real.is_file():
        raise LocalMediaError(_NOT_FOUND)
    return real


def read_allowed(path: str, allowed_dir: Optional[str], max_bytes: int) -> bytes:
    """The bytes of an allowed local image, read no further than max_bytes + 1.
    Blocking: run it off the event loop."""
    real = resolve_allowed(path, allowed_dir)
    try:
        # A symlink or FIFO swapped in after the check is neither followed nor waited on.
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        descriptor = os.open(real, flags)
    except OSError:
        raise LocalMediaError(_NOT_FOUND) from None
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise LocalMediaError(_NOT_FOUND)
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise LocalMediaError(f"local image is larger than the limit of {max_bytes} bytes")
    return data
