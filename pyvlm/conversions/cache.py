"""Folders built once into pyvlm's cache and published atomically."""

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

logger = logging.getLogger("pyvlm.conversions")

# A folder counts as built once this file is in it (every transformers
# checkpoint has one).
BUILT_MARKER = "config.json"


def cache_root() -> Path:
    """$PYVLM_CACHE_DIR, else $XDG_CACHE_HOME/pyvlm, else ~/.cache/pyvlm."""
    if os.environ.get("PYVLM_CACHE_DIR"):
        return Path(os.environ["PYVLM_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "pyvlm"


def built_once(name: str, build: Callable[[Path], None]) -> Path:
    """cache_root()/name, calling build(folder) to fill it the first time.

    build writes into a fresh temporary folder beside the target, which is
    renamed into place only when build returns: a failed or interrupted build
    leaves nothing behind, and readers see no folder or a complete one.
    """
    target = cache_root() / name
    if (target / BUILT_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Building %s (first use only)", target)
    building = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=target.parent))
    try:
        build(building)
        _publish(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def _publish(building: Path, target: Path) -> None:
    # rename is atomic. If another process published first, its copy is as
    # good as ours.
    try:
        building.rename(target)
    except OSError:
        if not (target / BUILT_MARKER).is_file():
            raise
