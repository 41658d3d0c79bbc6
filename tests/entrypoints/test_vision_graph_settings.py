"""How many vision-tower CUDA graphs the engine keeps (--vision-cuda-graphs)
and whether its tower takes a side stream (--vision-side-stream, and
--vision-tower-sms for a green context's),
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
    # on a green context's stream the tower runs eagerly (not yet run on a GPU)
    ({"vision_side_stream": True, "vision_tower_sms": 32}, "cuda", 0),
    ({"vision_side_stream": True}, "cuda", 8),
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


@pytest.mark.parametrize("flags, message", [
    (["--vision-tower-sms", "32"], "--vision-tower-sms needs --vision-side-stream"),
    (["--vision-tower-sms", "-1", "--vision-side-stream"], "--vision-tower-sms must be >= 0"),
])
def test_the_server_refuses_tower_sms_it_cannot_use(flags, message):
    import argparse

    from pyvlm.server.args import add_server_arguments, server_args_from

    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    with pytest.raises(ValueError, match=message):
        server_args_from(parser.parse_args(flags))
    accepted = server_args_from(parser.parse_args(["--vision-tower-sms", "32",
                                                   "--vision-side-stream"]))
    assert accepted.engine_kwargs()["vision_tower_sms"] == 32
