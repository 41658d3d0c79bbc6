"""Whether the ops range-check their index tensors on CUDA, per thread.

Index tensors (slot ids, page ids, positions, token ids) are always checked on
CPU, where it is cheap. On CUDA each check costs a device-to-host sync, so it
runs only while the calling thread's setting is on; with it off the kernels
still never access memory out of bounds (they skip invalid indices), but a bad
index goes unreported. Every thread starts from the process default: on,
unless PYVLM_CHECK_INDICES=0 was set when the extension loaded. The engine
turns the checks off on its own thread only (ModelConfig.check_indices), so
the caller's threads keep theirs.
"""

import contextlib
from typing import Iterator

import torch

from ._library import ops


# Settings are side effects at run time: torch.compile must call them, never
# trace them into a graph.
@torch.compiler.disable
def index_checks_enabled() -> bool:
    """The calling thread's setting."""
    return ops.index_checks_enabled()


@torch.compiler.disable
def _set_index_checks(enabled: bool) -> bool:
    return ops.set_index_checks(bool(enabled))


@contextlib.contextmanager
def index_checks(enabled: bool) -> Iterator[None]:
    """Within the block, the calling thread checks indices on CUDA iff
    `enabled`; the previous setting comes back on exit, also on an exception.
    Other threads are not affected."""
    previous = _set_index_checks(enabled)
    try:
        yield
    finally:
        _set_index_checks(previous)
