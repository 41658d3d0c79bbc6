"""Overlap scheduling through the engine on real (tiny) models: step N+1
launched before step N is read, its tokens taken from step N's samples on
the device, gives exactly the tokens and finish reasons of plain steps, with
requests ending by length and by stop tokens at different steps, for 1-D
rotary, M-RoPE and cross-attention families. Under load (at most 3 running,
prompts in chunks of 24 tokens) requests wait for admission, prompts span
several steps and their chunks mix with the running decodes: steps with
prefill are launched while the step before is unread, and a request's first
decode is fed the token its prefill (in flight) samples. (Plain steps equal
transformers: tests/entrypoints/test_engine_parity*.py.)"""

import pytest

from pyvlm.scheduling.future_tokens import FUTURE_TOKEN
from tests.entrypoints.test_engine_parity import engine_for, make_prompts

LOADS = {"light": {}, "loaded": dict(max_running_requests=3, chunked_prefill_size=24)}


@pytest.fixture(scope="module", params=["qwen2", "qwen2_vl", "mllama", "llava"])
def checkpoint(request):
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


class LaunchCounts:
    """Wraps runner.launch (and each launched step's wait) to count the
    chunks fed a future token and the steps with prefill launched while an
    earlier step was unread."""

    def __init__(self, runner):
        self.num_future_feeds = self.num_overlapped_prefills = self.num_unread = 0
        self._launch = runner.launch
        runner.launch = self.launch

    def launch(self, batch):
        self.num_future_feeds += sum(c.token_ids == [FUTURE_TOKEN] for c in batch.chunks)
        self.num_overlapped_prefills += bool(self.num_unread) and not batch.is_decode
        launched = self._launch(batch)
        self.num_unread += 1
        wait = launched.wait

        def counted_wait():
            self.num_unread -= 1
            return wait()

        launched.wait = counted_wait
        return launched


def generate(checkpoint, overlap: bool, load: str, stop_token_ids=()):
    with engine_for(checkpoint, overlap_schedule=overlap, **LOADS[load]) as engine:
        counts = LaunchCounts(engine.state.runner)
        prompts = make_prompts(seed=8, image=engine.builder.image_token)
        params = [{"temperature": 0.0, "max_new_tokens": 3 + 4 * i, "ignore_eos": True,
                   "stop_token_ids": list(stop_token_ids)} for i in range(len(prompts))]
        results = engine.generate([p for p, _ in prompts], params,
                                  image_data=[ims for _, ims in prompts])
    assert (counts.num_future_feeds > 0) == overlap
    if load == "loaded":
        assert (counts.num_overlapped_prefills > 0) == overlap
    return [(r["output_ids"], r["meta_info"]["finish_reason"]["type"]) for r in results]


@pytest.mark.parametrize("load", list(LOADS))
def test_overlap_gives_the_tokens_of_plain_steps(checkpoint, load):
    plain = generate(checkpoint, overlap=False, load=load)
    assert generate(checkpoint, overlap=True, load=load) == plain
    # Stop tokens the requests draw mid-way end some of them while the step
    # launched after them is in flight.
    stops = {tokens[len(tokens) // 2] for tokens, _ in plain[2:] if len(tokens) > 4}
    plain_stopped = generate(checkpoint, overlap=False, load=load, stop_token_ids=stops)
    assert any(reason == "stop" for _, reason in plain_stopped)
    assert generate(checkpoint, overlap=True, load=load, stop_token_ids=stops) == plain_stopped
