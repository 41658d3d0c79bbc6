"""engine_process="process": the scheduler and the model in a spawned engine
process give thread mode's greedy tokens (text, and Qwen2-VL images whose
pixels cross the process boundary through shared memory), stream, abort,
and answer stats and flush_cache; a killed engine process fails the
requests in flight and every later one with EngineDeadError at once (never
a hang), health() says why, and the process is reaped."""

import asyncio
import os
import queue
import threading
import time

import pytest
import torch

import pyvlm
from pyvlm.entrypoints import core_channel
from pyvlm.entrypoints.core_messages import Add, Outputs
from pyvlm.scheduling.errors import EngineDeadError, RequestFailedError
from tests.entrypoints.engine_kills import kill_while_in_flight, random_image, refused_at_once

ENGINE_ARGS = dict(device="cpu", page_size=4, max_total_tokens=4096, context_length=2048)
GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
LONG = dict(GREEDY, max_new_tokens=1500)


@pytest.fixture(scope="module")
def process_engine(tiny_checkpoint_qwen2_vl):
    with pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), engine_process="process",
                      **ENGINE_ARGS) as engine:
        yield engine
    # shutdown() stopped the engine process cleanly and reaped it
    assert engine.health() == "the engine is not running"
    assert engine.step_loop._process.exitcode == 0
    assert not os.path.exists(f"/proc/{engine.step_loop.pid}")


@pytest.fixture(scope="module")
def thread_engine(tiny_checkpoint_qwen2_vl):
    with pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), engine_process="thread",
                      **ENGINE_ARGS) as engine:
        yield engine


def test_greedy_tokens_equal_thread_modes_for_text_and_images(process_engine, thread_engine):
    assert process_engine.state.core is None and thread_engine.state.core is not None
    prompts = ["the cat sat", "<image>\ndescribe", "<image><image> which differs?"]
    images = [None, random_image(60, 90, 0), [random_image(50, 40, 1), random_image(80, 80, 2)]]
    messages = [{"role": "user", "content": [
        {"type": "image", "image": random_image(70, 50, 3)}, {"type": "text", "text": "hi"}]}]
    for engine_args in (dict(prompt=prompts, sampling_params=GREEDY, image_data=images),
                        dict(messages=messages, sampling_params=GREEDY)):
        in_process = process_engine.generate(**engine_args)
        in_thread = thread_engine.generate(**engine_args)
        assert in_process == in_thread  # tokens, text and meta_info alike


def test_outputs_come_back_one_message_per_step(process_engine, monkeypatch):
    client, messages = process_engine.step_loop, []
    dispatch = client._dispatch

    def recording(message):
        if isinstance(message, Outputs):
            messages.append([rid for rid, _, _ in message.items])
        dispatch(message)

    monkeypatch.setattr(client, "_dispatch", recording)
    results = process_engine.generate([f"story {i}" for i in range(4)], GREEDY)
    assert all(len(r["output_ids"]) == 12 for r in results)
    assert max(len(rids) for rids in messages) == 4  # a decode step of the batch: one message
    assert len(messages) < 4 * 12


def test_async_generate_streams_deltas_that_add_up(process_engine):
    async def collect():
        return [delta async for delta in process_engine.async_generate(
            "<image>\nwhat is it?", GREEDY, image_data=random_image(40, 60, 4))]

    deltas = asyncio.run(collect())
    whole = process_engine.generate("<image>\nwhat is it?", GREEDY,
                                    image_data=random_image(40, 60, 4))
    assert sum((d["token_ids"] for d in deltas), []) == whole["output_ids"]
    assert "".join(d["text"] for d in deltas) == whole["text"]
    assert [d["finished"] for d in deltas] == [False] * (len(deltas) - 1) + [True]


def test_leaving_a_stream_early_aborts_the_request_in_the_engine_process(process_engine):
    async def take_two():
        stream = process_engine.async_generate("a long story", LONG)
        got = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()
        return got

    assert len(asyncio.run(take_two())) == 2
    for _ in range(100):  # the abort reaches the engine process between steps
        stats = process_engine.get_stats()
        if stats["num_running_reqs"] == 0:
            break
        time.sleep(0.01)
    assert stats["num_running_reqs"] == 0 and stats["num_queued_reqs"] == 0


def test_stats_and_flush_cache_run_in_the_engine_process(process_engine):
    image = random_image(64, 64, 5)
    first = process_engine.generate("<image>\ndescribe", GREEDY, image_data=image)
    second = process_engine.generate("<image>\ndescribe", GREEDY, image_data=image)
    assert second["meta_info"]["cached_tokens"] > 0 and second["output_ids"] == first["output_ids"]
    assert process_engine.get_stats()["num_cached_pages"] > 0
    assert process_engine.flush_cache()
    assert process_engine.get_stats()["num_cached_pages"] == 0
    third = process_engine.generate("<image>\ndescribe", GREEDY, image_data=image)
    assert third["meta_info"]["cached_tokens"] == 0


def test_request_pixels_travel_through_shared_memory_not_pickled(process_engine):
    request = asyncio.run(process_engine.async_build("<image>\ndescribe", GREEDY,
                                                     image_data=random_image(224, 224, 6)))
    try:
        pixels = request.mm_items[0].prepared.pixel_values
        assert pixels.is_shared()  # moved when built (a builder thread), not when sent
        num_pixel_bytes = pixels.numel() * pixels.element_size()
        packet = core_channel.pack(Add(request))
        assert num_pixel_bytes > 500_000
        assert len(packet.frame) < num_pixel_bytes / 20  # the prompt and a handle, not the pixels
        assert pixels.flatten()[:64].numpy().tobytes() not in packet.frame
        assert len(packet.fds) == 1  # the pixels' shared memory, passed beside the frame
    finally:
        process_engine.discard(request)


def test_the_step_clock_is_read_from_shared_memory(process_engine):
    seen = []

    async def watch():
        stream = process_engine.async_generate("a long story", dict(LONG, max_new_tokens=300))
        async for _ in stream:
            seen.append(process_engine.step_running_for())

    asyncio.run(watch())
    assert any(s is not None and 0 <= s < 5 for s in seen)
    assert process_engine.step_running_for() is None  # between steps


def test_a_loaded_model_needs_thread_mode(tiny_checkpoint_qwen2_vl):
    with pytest.raises(ValueError, match="engine_process='thread'"):
        pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), loaded_model=torch.nn.Linear(1, 1),
                     engine_process="process", **ENGINE_ARGS)


def test_a_killed_engine_process_fails_in_flight_and_later_requests_at_once(
        tiny_checkpoint_qwen2_vl):
    engine = pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), engine_process="process",
                          **ENGINE_ARGS)
    pid = engine.step_loop.pid
    try:
        kill_while_in_flight(engine, pid, LONG, "killed by SIGKILL", "killed by SIGKILL")
        assert engine.step_running_for() is None
        with pytest.raises(EngineDeadError, match="killed by SIGKILL"):
            engine.generate("too late", GREEDY)
        refused_at_once(engine.get_stats)
    finally:
        engine.shutdown()
    assert not os.path.exists(f"/proc/{pid}")  # reaped: no zombie
    assert not [name for name in os.listdir("/dev/shm") if f"_{pid}_" in name]


def test_a_request_that_cannot_be_pickled_fails_alone(process_engine):
    request = asyncio.run(process_engine.async_build("a story", GREEDY))
    request.cache_node = threading.Lock()  # (no lock pickles)
    results: "queue.Queue" = queue.Queue()
    process_engine.step_loop.submit(request, lambda out, err: results.put((out, err)))
    out, err = results.get(timeout=10)  # from the sender thread
    assert out is None and isinstance(err, RequestFailedError)
    assert "cannot send the request (TypeError)" in str(err)
    assert len(process_engine.generate("a story", GREEDY)["output_ids"]) == 12
