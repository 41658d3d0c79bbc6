"""Overlap scheduling through the engine on real (tiny) models: decode step
N+1 launched before step N is read, its tokens taken from step N's samples
on the device, gives exactly the tokens and finish reasons of plain steps,
with requests ending by length and by stop tokens at different steps, for
1-D rotary, M-RoPE and cross-attention families. (Plain steps equal
transformers: tests/entrypoints/test_engine_parity*.py.)"""

import pytest

from pyvlm.scheduling.future_tokens import FUTURE_TOKEN
from tests.entrypoints.test_engine_parity import engine_for, make_prompts


@pytest.fixture(scope="module", params=["qwen2", "qwen2_vl", "mllama", "llava"])
def checkpoint(request):
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


def count_future_feeds(runner) -> list:
    """Wraps runner.launch to count the chunks fed a future token."""
    counts, launch = [0], runner.launch

    def counting(batch):
        counts[0] += sum(c.token_ids == [FUTURE_TOKEN] for c in batch.chunks)
        return launch(batch)

    runner.launch = counting
    return counts


def generate(checkpoint, overlap: bool, stop_token_ids=()):
    with engine_for(checkpoint, overlap_schedule=overlap) as engine:
        futures = count_future_feeds(engine.state.runner)
        prompts = make_prompts(seed=8, image=engine.builder.image_token)
        params = [{"temperature": 0.0, "max_new_tokens": 3 + 4 * i, "ignore_eos": True,
                   "stop_token_ids": list(stop_token_ids)} for i in range(len(prompts))]
        results = engine.generate([p for p, _ in prompts], params,
                                  image_data=[ims for _, ims in prompts])
    assert (futures[0] > 0) == overlap
    return [(r["output_ids"], r["meta_info"]["finish_reason"]["type"]) for r in results]


def test_overlap_gives_the_tokens_of_plain_steps(checkpoint):
    plain = generate(checkpoint, overlap=False)
    assert generate(checkpoint, overlap=True) == plain
    # Stop tokens the requests draw mid-way end some of them a step before
    # the step launched after them has run.
    stops = {tokens[len(tokens) // 2] for tokens, _ in plain[2:] if len(tokens) > 4}
    plain_stopped = generate(checkpoint, overlap=False, stop_token_ids=stops)
    assert any(reason == "stop" for _, reason in plain_stopped)
    assert generate(checkpoint, overlap=True, stop_token_ids=stops) == plain_stopped
