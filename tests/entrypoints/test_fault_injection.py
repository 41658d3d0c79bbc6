"""Fault isolation through the real engine: an error injected for one chosen
request at one stage (vision, prefill, decode, sampling) fails that request
alone with RequestFailedError; the other 7 of a concurrent mix still give
transformers' greedy tokens, and page accounting returns to idle. A device
failure stops the engine: every request in flight and every later one gets
EngineDeadError at once (nothing waits forever), and health() says why."""

import asyncio

import pytest
import torch

from pyvlm.scheduling.errors import DeviceFailure, EngineDeadError, RequestFailedError
from tests.entrypoints.test_engine_parity import (GREEDY, Reference, engine_for, make_prompts)

STAGES = ["vision", "prefill", "decode", "sampling"]
VICTIM = 5  # a prompt with one image (see make_prompts)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_qwen2):
    return tiny_checkpoint_qwen2


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(seed=3, image="<image>")


@pytest.fixture(scope="module")
def reference(checkpoint):
    from transformers import LlavaOnevisionForConditionalGeneration

    hf_model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32).eval()
    with engine_for(checkpoint) as engine:
        return Reference(hf_model, engine)


def fail_at(stage: str, rid: str, error: BaseException):
    """A runner fault hook raising `error` whenever `rid` reaches `stage`."""
    def hook(at_stage, chunks):
        if at_stage == stage and any(chunk.rid == rid for chunk in chunks):
            raise error
    return hook


async def run_all(engine, prompts):
    """Every prompt as its own async request, concurrently; per request its
    output ids or the exception it ended with."""
    async def one(index, prompt, images):
        ids = []
        async for delta in engine.async_generate(prompt, GREEDY, image_data=images or None,
                                                 rid=f"p{index}"):
            ids.extend(delta["token_ids"])
        return ids

    return await asyncio.gather(*(one(i, p, ims) for i, (p, ims) in enumerate(prompts)),
                                return_exceptions=True)


@pytest.mark.parametrize("stage", STAGES)
def test_a_fault_fails_only_its_request(checkpoint, prompts, reference, stage):
    with engine_for(checkpoint, chunked_prefill_size=48) as engine:
        engine.state.runner.fault_hook = fail_at(stage, f"p{VICTIM}", RuntimeError("injected"))
        results = asyncio.run(run_all(engine, prompts))
        stats = engine.get_stats()
        engine.state.runner.fault_hook = None
        assert engine.health() is None
        after = engine.generate(*prompts[VICTIM][:1], GREEDY, image_data=prompts[VICTIM][1])
    assert isinstance(results[VICTIM], RequestFailedError), results[VICTIM]
    assert "RuntimeError" in str(results[VICTIM])
    for index, ((prompt, images), result) in enumerate(zip(prompts, results)):
        if index != VICTIM:
            assert result == reference.tokens(prompt, images), (index, result)
    assert stats["num_failed_requests"] == 1
    assert stats["num_running_reqs"] == stats["num_queued_reqs"] == 0
    assert stats["num_used_pages"] == 0  # every page left belongs to the prefix cache
    # The engine serves on, and the failed request's prompt works once the fault is gone.
    assert after["output_ids"] == reference.tokens(*prompts[VICTIM])


def test_a_device_failure_stops_the_engine_for_everyone(checkpoint, prompts):
    with engine_for(checkpoint) as engine:
        engine.state.runner.fault_hook = fail_at("decode", "p2", DeviceFailure("injected"))
        results = asyncio.run(asyncio.wait_for(run_all(engine, prompts), 60))
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert "device failed" in engine.health()
        with pytest.raises(EngineDeadError):  # a later request: refused at once
            engine.generate("the cat", GREEDY)
        later = asyncio.run(asyncio.wait_for(run_all(engine, prompts[:2]), 10))
        assert all(isinstance(r, EngineDeadError) for r in later)
        with pytest.raises(EngineDeadError):
            engine.get_stats()


def test_requests_after_shutdown_fail_at_once(checkpoint):
    engine = engine_for(checkpoint)
    engine.shutdown()
    [result] = asyncio.run(asyncio.wait_for(run_all(engine, [("the cat", [])]), 10))
    assert isinstance(result, EngineDeadError) and "shut down" in str(result)
    assert engine.health() is not None
