"""How many vision-tower CUDA graphs the engine keeps (--vision-cuda-graphs)
and whether its tower takes a side stream (--vision-side-stream),
resolved per device and flag; the graphs themselves: tests/layers/
test_shape_graphs.py, and on a GPU tests/entrypoints/test_engine_cuda.py."""

import pytest
import torch

from pyvlm.config import engine_config
from pyvlm.entrypoints.startup import takes_vision_side_stream, vision_graph_count


@pytest.mark.parametrize("settings, device, expected", [
    ({}, "cuda", 8),  # the default (pyvlm/config.py)
    ({"vision_cuda_graphs": 8}, "cuda", 8),
    ({"vision_cuda_graphs": 3}, "cuda", 3),
    ({"vision_cuda_graphs": 0}, "cuda", 0),
    ({"disable_cuda_graph": True}, "cuda", 0),
    ({}, "cpu", 0),
    ({"vision_cuda_graphs": 3}, "cpu", 0),
])
def test_count_resolves_per_device_and_flags(settings, device, expected):
    assert vision_graph_count(engine_config(**settings), torch.device(device)) == expected


@pytest.mark.parametrize("settings, device, expected", [
    ({}, "cuda", False),  # off by default until measured (pyvlm/config.py)
    ({"vision_side_stream": True}, "cuda", True),
    ({"vision_side_stream": True}, "cpu", False),  # no streams on a CPU
])
def test_the_side_stream_is_taken_on_cuda_when_asked(settings, device, expected):
    assert takes_vision_side_stream(engine_config(**settings), torch.device(device)) is expected


def test_a_cpu_engine_runs_its_tower_eagerly(tiny_checkpoint_qwen2_vl):
    import pyvlm

    with pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), device="cpu", page_size=4,
                      max_total_tokens=1024) as engine:
        assert not engine.state.runner.model.visual.shape_graphs.enabled
