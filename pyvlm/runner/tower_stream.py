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
Recent torch gives a green context a stream of its own (GreenContext.Stream;
torch 2.13 has it); earlier forms only run work on the context's default
stream, ordered after the caller's, so nothing would run beside: where this
torch has no such stream, start-up says so. Not yet measured on a GPU.
"""

from typing import List

import torch

# A green context must outlive its stream: the streams made here live as long
# as the process, and so do their contexts.
_CONTEXTS: List[object] = []


def tower_side_stream(device: torch.device, num_sms: int = 0) -> "torch.cuda.Stream":
    """A stream for the tower on device: an ordinary one (priority 0) for
    num_sms 0, else a green context's of num_sms SMs (the driver may round it
    up to its SM granularity). ValueError when num_sms is not below the
    device's SM count or this torch has no green-context streams."""
    if num_sms <= 0:
        return torch.cuda.Stream(device)
    total = torch.cuda.get_device_properties(device).multi_processor_count
    if num_sms >= total:
        raise ValueError(f"--vision-tower-sms {num_sms}: the device has {total} SMs; give the "
                         f"tower fewer, so the steps keep some")
    green = _green_contexts()
    if green is None:
        raise ValueError(f"--vision-tower-sms needs green contexts with streams of their own "
                         f"(torch.cuda.green_contexts, CUDA 12.8+); torch {torch.__version__} "
                         f"has none")
    context = green.GreenContext.create(num_sms=num_sms, device_id=_index(device))
    _CONTEXTS.append(context)
    return context.Stream()


def _green_contexts():
    """torch.cuda.green_contexts where it can give streams, else None."""
    try:
        from torch.cuda import green_contexts
    except ImportError:
        return None
    if not getattr(green_contexts, "SUPPORTED", False):
        return None
    if not hasattr(green_contexts.GreenContext, "Stream"):
        return None
    return green_contexts


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
