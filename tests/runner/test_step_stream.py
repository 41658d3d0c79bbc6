"""Steps on a stream of their own (ModelRunner.step_stream, beside a vision
side stream): each launch is ordered after what the caller's stream queued
and the caller's stream after it, with torch.cuda's stream calls recorded
(this machine has no GPU; tests/entrypoints/test_engine_cuda.py runs the
real streams), and the tokens are those of steps on the caller's stream."""

import random

from tests.entrypoints.test_engine_parity import engine_for
from tests.runner.test_encoder_cache import RecordedCuda
from tests.runner.test_future_tokens import run_requests


def test_steps_on_their_own_stream_wait_for_the_caller_and_the_caller_for_them(
        tiny_checkpoint_qwen2, monkeypatch):
    rng = random.Random()
    prompts = [[rng.randrange(5, 200) for _ in range(rng.randint(3, 20))] for _ in range(3)]
    pages = [list(range(16 * i, 16 * i + 16)) for i in range(3)]
    with engine_for(tiny_checkpoint_qwen2, max_total_tokens=1024) as engine:
        runner = engine.state.runner
        on_callers = run_requests(runner, prompts, pages, 4, overlapped=True)
        cuda = RecordedCuda(monkeypatch)
        runner.step_stream = cuda.new_stream("steps")
        try:
            on_own = run_requests(runner, prompts, pages, 4, overlapped=True)
        finally:
            runner.step_stream = None
    assert on_own == on_callers
    one_launch = [("steps", "waits for stream", "step"), ("enter", "steps"), ("exit", "steps"),
                  ("step", "waits for stream", "steps")]
    assert cuda.calls == one_launch * 5  # the prefill and 4 decode steps
