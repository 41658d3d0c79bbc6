"""The engine's index-check setting (ModelConfig.check_indices): resolved per
device, applied on the engine thread during its steps, and never on the
caller's thread. The CUDA side is in test_engine_cuda.py."""

import threading

import pytest
import torch

import pyvlm
from pyvlm import ops
from pyvlm.config import engine_config
from pyvlm.entrypoints.startup import index_checks_for


@pytest.mark.parametrize("check_indices, device, expected", [
    (None, "cpu", True), (None, "cuda", False),  # CUDA: the checks' host syncs stall decode
    (True, "cuda", True), (False, "cpu", False),
])
def test_setting_resolves_per_device_unless_given(check_indices, device, expected):
    config = engine_config(check_indices=check_indices)
    assert index_checks_for(config, torch.device(device)) is expected


@pytest.mark.parametrize("check_indices", [None, False, True])
def test_engine_steps_run_with_the_engine_setting_on_the_engine_thread(
        tiny_checkpoint_qwen2, check_indices):
    args = {} if check_indices is None else {"check_indices": check_indices}
    seen = []
    with pyvlm.Engine(model=str(tiny_checkpoint_qwen2), device="cpu", page_size=4,
                      max_total_tokens=1024, **args) as engine:
        model = engine.state.runner.model
        forward = model.forward

        def recording_forward(*inputs, **kwargs):
            seen.append((threading.current_thread().name, ops.index_checks_enabled()))
            return forward(*inputs, **kwargs)

        model.forward = recording_forward
        result = engine.generate("the cat sat", {"max_new_tokens": 3, "temperature": 0,
                                                 "ignore_eos": True})
        assert ops.index_checks_enabled()  # the caller's thread keeps its own
    expected = check_indices is not False  # None on CPU: on
    assert len(result["output_ids"]) == 3 and len(seen) == 3  # one prefill, two decodes
    assert set(seen) == {("pyvlm-engine", expected)}
