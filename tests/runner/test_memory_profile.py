"""The KV pool's size leaves room for what steps need: the budget
arithmetic (CPU) and, on CUDA, a measured reserve that covers the memory
the engine then really uses."""

import pytest
import torch

from pyvlm.runner.kv_pool import token_budget
from tests.entrypoints.test_engine_parity import engine_for, make_prompts

GIB = 1 << 30


def test_token_budget_leaves_the_reserve_out():
    total, used, per_token = 80 * GIB, 15 * GIB, 57344
    without = token_budget(total, used, 0.85, 0, per_token)
    with_reserve = token_budget(total, used, 0.85, 3 * GIB, per_token)
    assert without == (int(total * 0.85) - used) // per_token
    assert without - with_reserve == pytest.approx(3 * GIB / per_token, abs=1)


def test_no_room_left_is_a_clear_error():
    with pytest.raises(RuntimeError, match="leaves no room for the KV cache.*2.0 GiB more"):
        token_budget(80 * GIB, 67 * GIB, 0.85, 2 * GIB, 1 << 20)


def test_the_cpu_reserves_nothing(tiny_checkpoint_qwen2):
    with engine_for(tiny_checkpoint_qwen2) as engine:
        assert engine.state.runner.step_memory.total == 0


@pytest.mark.cuda
def test_steps_stay_inside_the_fraction(tiny_checkpoint_qwen2_vl):
    """After start-up and a batch of image requests, the allocator's peak
    stays inside --mem-fraction-static of the card."""
    fraction = 0.5
    torch.cuda.reset_peak_memory_stats()
    with engine_for(tiny_checkpoint_qwen2_vl, device="cuda", max_total_tokens=None,
                    mem_fraction_static=fraction, engine_process="thread") as engine:
        memory = engine.state.runner.step_memory
        assert memory.prefill_bytes > 0 and memory.decode_bytes > 0
        prompts = make_prompts(seed=7, image=engine.builder.image_token)
        engine.generate([p for p, _ in prompts], {"max_new_tokens": 8, "temperature": 0},
                        image_data=[ims for _, ims in prompts])
        _, total = torch.cuda.mem_get_info()
        assert torch.cuda.max_memory_allocated() <= total * fraction
