"""The extension's green-context stream (csrc/cuda/green_context.cu) on a GPU:
a live stream of the asked device with at least the SMs asked for and fewer
than all, on which torch's kernels give what they give on the default
stream, ordered against it by events. How it shares the device with other
streams is measured by benchmarks/bench_tower_beside_steps.py, not timed
here. The CPU side of the wrapper is tests/runner/test_tower_stream.py."""

import pytest
import torch

from pyvlm import ops

pytestmark = pytest.mark.cuda


def test_a_green_stream_runs_torch_work_as_the_default_stream_does():
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).multi_processor_count
    asked = int(torch.randint(1, total // 2, ()))
    handle, granted = ops.green_context_stream(device.index, asked, 0)
    assert handle != 0 and asked <= granted < total
    stream = torch.cuda.ExternalStream(handle, device=device)

    a = torch.randn(1024, 768, device=device)
    b = torch.randn(768, 512, device=device)
    expected = torch.empty(1024, 512, device=device).fill_(float("nan"))
    torch.matmul(a, b, out=expected)
    got = torch.full_like(expected, float("nan"))
    stream.wait_stream(torch.cuda.current_stream(device))  # a, b and got are written there
    with torch.cuda.stream(stream):
        torch.matmul(a, b, out=got)
        got.add_(1)
    torch.cuda.current_stream(device).wait_stream(stream)  # ordered back by an event
    got.sub_(1)
    torch.cuda.synchronize(device)
    torch.testing.assert_close(got, expected)


def test_green_streams_refuse_every_sm():
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).multi_processor_count
    with pytest.raises(ValueError, match="leave the other streams some"):
        ops.green_context_stream(device, total, 0)
    with pytest.raises(ValueError, match="must be positive"):
        ops.green_context_stream(device, 0, 0)
