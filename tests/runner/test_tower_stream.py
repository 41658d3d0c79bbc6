"""The tower's side stream (pyvlm/runner/tower_stream.py): an ordinary
stream by default; with --vision-tower-sms N the extension's green-context
stream of N SMs on the right device, wrapped for torch; clear errors for an
SM count the device lacks room for and for a build without green contexts.
torch.cuda and the extension's op are replaced by recorders (this machine
has no GPU); tests/ops/test_streams.py runs the op on one, and
benchmarks/bench_tower_beside_steps.py measures what it does."""

import types

import pytest
import torch

from pyvlm import ops
from pyvlm.runner import tower_stream


class FakeCuda:
    """torch.cuda's calls used here and the extension's stream op, recorded."""

    def __init__(self, monkeypatch, num_sms: int, current: int = 0):
        self.made = []
        monkeypatch.setattr(torch.cuda, "Stream", lambda device: ("stream on", device))
        monkeypatch.setattr(torch.cuda, "ExternalStream",
                            lambda handle, device: ("external stream", handle, device))
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: types.SimpleNamespace(multi_processor_count=num_sms))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(tower_stream.ops, "green_context_stream", self.green_context_stream)

    def green_context_stream(self, device_index, num_sms, priority):
        self.made.append((device_index, num_sms, priority))
        return 1000 + len(self.made), num_sms + num_sms % 8  # rounded up, as a driver may


def test_without_a_count_the_tower_gets_an_ordinary_stream(monkeypatch):
    fake = FakeCuda(monkeypatch, num_sms=132)
    device = torch.device("cuda", 1)
    assert tower_stream.tower_side_stream(device) == ("stream on", device)
    assert tower_stream.tower_side_stream(device, 0) == ("stream on", device)
    assert fake.made == []


def test_a_count_wraps_a_green_context_stream_of_that_device(monkeypatch):
    fake = FakeCuda(monkeypatch, num_sms=132, current=3)
    count = int(torch.randint(1, 132, ()))
    stream = tower_stream.tower_side_stream(torch.device("cuda", 1), count)
    assert fake.made == [(1, count, tower_stream.TOWER_PRIORITY)]
    assert stream == ("external stream", 1001, torch.device("cuda", 1))
    stream = tower_stream.tower_side_stream(torch.device("cuda"), 8)  # no index: the current one
    assert fake.made[-1][0] == 3 and stream[2] == torch.device("cuda", 3)


@pytest.mark.parametrize("count", [132, 200])
def test_the_tower_cannot_take_every_sm(monkeypatch, count):
    fake = FakeCuda(monkeypatch, num_sms=132)
    with pytest.raises(ValueError, match=f"--vision-tower-sms {count}: the device has 132 SMs"):
        tower_stream.tower_side_stream(torch.device("cuda", 0), count)
    assert fake.made == []


def test_a_build_without_green_contexts_is_named(monkeypatch):
    FakeCuda(monkeypatch, num_sms=132)

    def refuse(device_index, num_sms, priority):
        raise RuntimeError("cuGreenCtxStreamCreate is not available\nmore lines")

    monkeypatch.setattr(tower_stream.ops, "green_context_stream", refuse)
    with pytest.raises(ValueError, match="needs CUDA green contexts.*cuGreenCtxStreamCreate "
                                         "is not available$"):
        tower_stream.tower_side_stream(torch.device("cuda", 0), 32)


@pytest.mark.skipif(ops.has_cuda_kernels(), reason="the CUDA build makes green contexts "
                    "(tests/ops/test_streams.py)")
def test_a_build_without_cuda_says_so():
    with pytest.raises(RuntimeError, match="this build of pyvlm's extension has no CUDA"):
        ops.green_context_stream(0, 16)
