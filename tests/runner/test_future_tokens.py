"""Launching decode step N+1 before reading step N (overlap scheduling):
chunks feeding FUTURE_TOKEN get the tokens step N drew on the device, so
the tokens equal those of steps run one after the other, eagerly and
through the (emulated) graph buffers."""

import random

import pytest

from pyvlm.scheduling.future_tokens import FUTURE_TOKEN
from pyvlm.scheduling.types import ForwardBatch, SamplingParams, SequenceChunk
from tests.entrypoints.test_engine_parity import engine_for

SAMPLING = SamplingParams(temperature=0.8, top_p=0.9)  # seeded draws: any token may come


def chunk(rid, tokens, start, pages, seed, step):
    return SequenceChunk(rid=rid, token_ids=list(tokens), start_pos=start,
                         positions=[list(range(start, start + len(tokens)))], page_table=pages,
                         mm_items=[], sample=True, sampling=SAMPLING, seed=seed, step=step)


def run_requests(runner, prompts, pages, num_steps, overlapped):
    """Prefills each prompt, then decodes num_steps tokens for all of them;
    overlapped: each decode step is launched before the previous is read."""
    first = runner.forward(ForwardBatch(False, [
        chunk(f"r{i}", p, 0, pages[i], seed=i, step=0) for i, p in enumerate(prompts)]))
    outputs = [[r.token_id] for r in first]
    pending = None
    for step in range(1, num_steps + 1):
        feeds = [FUTURE_TOKEN if overlapped and pending else out[-1] for out in outputs]
        batch = ForwardBatch(True, [
            chunk(f"r{i}", [feeds[i]], len(p) + step - 1, pages[i], seed=i, step=step)
            for i, p in enumerate(prompts)])
        launched = runner.launch(batch)
        if pending is not None:
            for out, result in zip(outputs, pending.wait()):
                out.append(result.token_id)
        if overlapped:
            pending = launched
        else:
            for out, result in zip(outputs, launched.wait()):
                out.append(result.token_id)
    if pending is not None:
        for out, result in zip(outputs, pending.wait()):
            out.append(result.token_id)
    return outputs


@pytest.mark.parametrize("graphs", [False, True])
def test_future_tokens_give_the_tokens_of_sequential_steps(tiny_checkpoint_qwen2, graphs):
    rng = random.Random()
    with engine_for(tiny_checkpoint_qwen2, max_total_tokens=1024) as engine:
        runner = engine.state.runner
        if graphs:
            runner.capture_decode_graphs(4, 256, emulate=True)
        prompts = [[rng.randrange(5, 200) for _ in range(rng.randint(3, 20))] for _ in range(3)]
        pages = [list(range(16 * i, 16 * i + 16)) for i in range(3)]
        sequential = run_requests(runner, prompts, pages, 6, overlapped=False)
        overlapped = run_requests(runner, prompts, pages, 6, overlapped=True)
    assert overlapped == sequential
    assert all(len(out) == 7 for out in sequential)


def test_a_future_token_without_a_launched_sample_is_refused(tiny_checkpoint_qwen2):
    with engine_for(tiny_checkpoint_qwen2, max_total_tokens=1024) as engine:
        batch = ForwardBatch(True, [chunk("nobody", [FUTURE_TOKEN], 3, [0], seed=0, step=1)])
        with pytest.raises(RuntimeError, match="no launched step drew"):
            engine.state.runner.launch(batch)
