"""Streams the extension makes: a green context's stream, confined to part of
the GPU's SMs (csrc/cuda/green_context.cu)."""

from typing import Tuple

import torch

from ._library import ops


def has_green_context_streams() -> bool:
    """True when the extension was built with CUDA, which makes them (the
    driver must still be CUDA 12.5 or newer)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "pyvlm::green_context_stream", "CompositeExplicitAutograd")


def green_context_stream(device_index: int, num_sms: int, priority: int = 0) -> Tuple[int, int]:
    """A new stream of CUDA device device_index confined to at least num_sms
    SMs, at priority (CUDA's: lower runs first). Returns the stream handle
    (for torch.cuda.ExternalStream) and the SMs the driver granted; stream
    and context live as long as the process. RuntimeError where the
    extension has no CUDA or the driver no green contexts."""
    if not has_green_context_streams():
        raise RuntimeError("this build of pyvlm's extension has no CUDA, so no green contexts")
    handle, granted = ops.green_context_stream(int(device_index), int(num_sms), int(priority))
    return handle, granted
