"""The vision tower's side stream (--vision-side-stream), and with
--vision-tower-sms N a stream confined to N of the GPU's SMs.

A side stream of lower priority than the steps' does not keep the tower off
the steps' way: the GPU starts waiting blocks by priority, but a tower block
already running keeps its SM until it is done, and every one of a decode
step's short kernels waits for some to drain (on an H100, a 7B model's
decode step took 29-31 ms beside a tower against 6.9 alone;
benchmarks/RESULTS.md). A CUDA green context of N SMs bounds the tower to
those N, so the steps always have the rest: a decode step, bound by memory
bandwidth, needs only part of the SMs to read its weights at full speed.
The green context and its stream come from pyvlm's extension
(torch.ops.pyvlm.green_context_stream, the driver's green-context API, CUDA
12.5+ drivers): only some torch releases give a green context a stream of its
own. Not yet measured on a GPU.
"""

import logging

import torch

from pyvlm import ops

logger = logging.getLogger(__name__)

# The extension's stream priority for the tower: 0, the lowest, below the
# steps' stream (startup.py gives the steps -1).
TOWER_PRIORITY = 0


def tower_side_stream(device: torch.device, num_sms: int = 0) -> "torch.cuda.Stream":
    """A stream for the tower on device: an ordinary one (priority 0) for
    num_sms 0, else a green context's of num_sms SMs (the driver may round it
    up to its SM granularity). ValueError when num_sms is not below the
    device's SM count or green contexts are not available (an extension
    built without CUDA or with a toolkit older than 12.5, a driver older
    than CUDA 12.5)."""
    if num_sms <= 0:
        return torch.cuda.Stream(device)
    total = torch.cuda.get_device_properties(device).multi_processor_count
    if num_sms >= total:
        raise ValueError(f"--vision-tower-sms {num_sms}: the device has {total} SMs; give the "
                         f"tower fewer, so the steps keep some")
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        handle, granted = ops.green_context_stream(index, num_sms, TOWER_PRIORITY)
    except RuntimeError as exc:
        raise ValueError(f"--vision-tower-sms needs CUDA green contexts, which this build "
                         f"or driver cannot make: {str(exc).splitlines()[0]}") from exc
    logger.info("vision tower stream: a green context of %d SMs (%d asked for) of %d",
                granted, num_sms, total)
    return torch.cuda.ExternalStream(handle, device=torch.device("cuda", index))
