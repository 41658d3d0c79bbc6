"""The budget for preprocessed images of unfinished requests: a request
that does not fit waits (offline batches) or is refused with
EngineBusyError (the server's 429); one request larger than the whole
budget still runs alone; every path gives its bytes back."""

import asyncio
import threading

import pytest
from PIL import Image

import pyvlm
from pyvlm.scheduling.errors import EngineBusyError
from pyvlm.entrypoints.image_budget import ImageBudget

GREEDY = {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True}


def test_take_waits_or_refuses_and_one_oversized_request_runs_alone():
    budget = ImageBudget(100)
    budget.take(500, wait=False)  # nothing held: allowed although larger than the budget
    with pytest.raises(EngineBusyError, match="--max-pending-image-bytes"):
        budget.take(1, wait=False)
    taken = threading.Event()
    waiter = threading.Thread(target=lambda: (budget.take(60, wait=True), taken.set()))
    waiter.start()
    assert not taken.wait(0.2)  # waits while the 500 bytes are held
    budget.give_back(500)
    assert taken.wait(5)
    waiter.join()
    assert budget.num_held_bytes == 60
    with pytest.raises(EngineBusyError):
        budget.take(41, wait=False)
    budget.take(40, wait=False)
    assert budget.num_held_bytes == 100


def image(side):
    return Image.new("RGB", (side, side), (side % 256, 10, 20))


@pytest.fixture(scope="module")
def engine(tiny_checkpoint_qwen2):
    # The tiny tower's single-image input is at most 10 tiles of 3 x 32 x 32 float32.
    with pyvlm.Engine(model=str(tiny_checkpoint_qwen2), device="cpu", page_size=4,
                      max_total_tokens=4096, max_pending_image_bytes=30_000) as eng:
        yield eng


def test_a_batch_over_the_budget_waits_and_every_request_gives_its_bytes_back(engine):
    results = engine.generate(["<image> a"] * 6, GREEDY, image_data=[[image(40 + i)]
                                                                     for i in range(6)])
    assert all(len(r["output_ids"]) == 2 for r in results)
    assert engine.builder.image_budget.num_held_bytes == 0


def test_async_requests_over_the_budget_are_refused_and_released(engine):
    async def one(i):
        out = []
        async for delta in engine.async_generate("<image> a", dict(GREEDY, max_new_tokens=30),
                                                 image_data=[image(60 + i)]):
            out.extend(delta["token_ids"])
        return out

    async def burst():
        return await asyncio.gather(*(one(i) for i in range(8)), return_exceptions=True)

    results = asyncio.run(burst())
    refused = [r for r in results if isinstance(r, EngineBusyError)]
    answered = [r for r in results if isinstance(r, list)]
    assert refused and answered and len(refused) + len(answered) == 8
    assert all(len(r) == 30 for r in answered)
    assert engine.builder.image_budget.num_held_bytes == 0


def test_a_request_abandoned_while_it_is_built_gives_its_bytes_back(engine):
    async def abandon():
        stream = engine.async_generate("<image> a", GREEDY, image_data=[image(90)])
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the build has started in the executor
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)  # the build finishes and is released

    asyncio.run(abandon())
    assert engine.builder.image_budget.num_held_bytes == 0
