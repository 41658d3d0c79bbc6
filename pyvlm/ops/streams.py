"""Streams the extension makes: a green context's stream, confined to part of
the GPU's SMs (csrc/cuda/green_context.cu)."""

from typing import Tuple

from ._library import ops


def green_context_stream(device_index: int, num_sms: int, priority: int = 0) -> Tuple[int, int]:
    """A new stream of CUDA device device_index confined to at least num_sms
    SMs, at priority (CUDA's: lower runs first). Returns the stream handle
    (for torch.cuda.ExternalStream) and the SMs the driver granted; stream
    and context live as long as the process. RuntimeError where the
    extension was built without CUDA or the driver has no green contexts."""
    handle, granted = ops.green_context_stream(int(device_index), int(num_sms), int(priority))
    return handle, granted
