"""The tower's side stream (pyvlm/runner/tower_stream.py): an ordinary
stream by default; with --vision-tower-sms N a green context's stream of N
SMs, the context kept alive; clear errors for an SM count the device lacks
room for and for a torch without green-context streams. torch.cuda is
replaced by recorders (this machine has no GPU); the device's answer is
benchmarks/bench_tower_beside_steps.py."""

import re
import types

import pytest
import torch

from pyvlm.runner import tower_stream


class FakeCuda:
    """torch.cuda's calls used here, recorded; green: the green_contexts
    module to offer (None: this torch has none)."""

    def __init__(self, monkeypatch, num_sms: int, green=None):
        monkeypatch.setattr(torch.cuda, "Stream", lambda device: ("stream on", device))
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: types.SimpleNamespace(multi_processor_count=num_sms))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(tower_stream, "_green_contexts", lambda: green)
        monkeypatch.setattr(tower_stream, "_CONTEXTS", [])


def fake_green_contexts(made: list):
    class GreenContext:
        def __init__(self, num_sms, device_id):
            self.num_sms, self.device_id = num_sms, device_id

        @staticmethod
        def create(*, num_sms, device_id):
            context = GreenContext(num_sms, device_id)
            made.append(context)
            return context

        def Stream(self):  # noqa: N802 - torch's name
            return ("green stream of", self.num_sms, "SMs on", self.device_id)

    return types.SimpleNamespace(GreenContext=GreenContext)


def test_without_a_count_the_tower_gets_an_ordinary_stream(monkeypatch):
    FakeCuda(monkeypatch, num_sms=132)
    device = torch.device("cuda", 1)
    assert tower_stream.tower_side_stream(device) == ("stream on", device)
    assert tower_stream.tower_side_stream(device, 0) == ("stream on", device)


def test_a_count_makes_a_green_context_stream_and_keeps_its_context(monkeypatch):
    made = []
    FakeCuda(monkeypatch, num_sms=132, green=fake_green_contexts(made))
    count = int(torch.randint(1, 132, ()))
    stream = tower_stream.tower_side_stream(torch.device("cuda", 1), count)
    assert stream == ("green stream of", count, "SMs on", 1)
    assert tower_stream._CONTEXTS == made and len(made) == 1  # outlives its stream
    tower_stream.tower_side_stream(torch.device("cuda"), 8)  # no index: the current device
    assert made[-1].device_id == 0


@pytest.mark.parametrize("count", [132, 200])
def test_the_tower_cannot_take_every_sm(monkeypatch, count):
    made = []
    FakeCuda(monkeypatch, num_sms=132, green=fake_green_contexts(made))
    with pytest.raises(ValueError, match=f"--vision-tower-sms {count}: the device has 132 SMs"):
        tower_stream.tower_side_stream(torch.device("cuda", 0), count)
    assert made == []


def test_a_torch_without_green_context_streams_is_named(monkeypatch):
    FakeCuda(monkeypatch, num_sms=132, green=None)
    with pytest.raises(ValueError, match=re.escape(f"torch {torch.__version__} has none")):
        tower_stream.tower_side_stream(torch.device("cuda", 0), 32)


def test_green_contexts_count_only_where_they_give_streams(monkeypatch):
    from torch.cuda import green_contexts

    found = tower_stream._green_contexts()
    expected = green_contexts.SUPPORTED and hasattr(green_contexts.GreenContext, "Stream")
    assert (found is green_contexts) if expected else found is None
    monkeypatch.delattr(green_contexts.GreenContext, "Stream", raising=False)
    assert tower_stream._green_contexts() is None
