"""What the engine-process tests share: killing a process of a running
engine while one request streams and another blocks, and checking that
both fail with EngineDeadError at once (never a hang) and later requests
are refused at once; and random test images."""

import asyncio
import os
import signal
import threading
import time

import pytest
import torch
from PIL import Image

from pyvlm.scheduling.errors import EngineDeadError


def random_image(height: int, width: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy())


def kill_while_in_flight(engine, pid: int, long_params: dict, death: str,
                         health_says: str) -> None:
    """SIGKILLs pid (the engine process or one of its ranks) while a request
    streams and another blocks in generate: both must fail with
    EngineDeadError (the stream's matching the regex `death`) within 5 s of
    the kill, and health() must contain health_says. Leaves the engine dead
    (not shut down)."""
    blocking = {}

    def generate_blocking():
        try:
            blocking["result"] = engine.generate("a blocking story", long_params)
        except Exception as exc:
            blocking["error"] = exc

    async def kill_while_streaming() -> float:
        stream = engine.async_generate("a long story", long_params)
        await stream.__anext__()
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(EngineDeadError, match=death):
            async for _ in stream:
                pass
        return time.monotonic() - killed_at

    thread = threading.Thread(target=generate_blocking)
    thread.start()
    assert asyncio.run(asyncio.wait_for(kill_while_streaming(), 30)) < 5
    thread.join(10)
    assert not thread.is_alive() and isinstance(blocking.get("error"), EngineDeadError)
    assert health_says in engine.health()


def refused_at_once(call) -> None:
    """call() raises EngineDeadError within a second (a dead engine refuses)."""
    started = time.monotonic()
    with pytest.raises(EngineDeadError):
        call()
    assert time.monotonic() - started < 1
