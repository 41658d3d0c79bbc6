"""benchmarks/simulate_steps.py: the engine API's engine takes the same
flags the HTTP server is given (--server-args); the cost models; the trace's
charge for the images a step encodes."""

import pytest

from benchmarks.simulate_steps import extra_engine_args


def test_server_args_become_the_engine_keywords_they_change():
    assert extra_engine_args("") == {}
    assert extra_engine_args("--piecewise-cuda-graph-max-tokens 0 --vision-cuda-graphs 0") == {
        "piecewise_cuda_graph_max_tokens": 0, "vision_cuda_graphs": 0}
    assert extra_engine_args("--max-running-requests 32") == {"max_running_requests": 32}


def test_the_roofline_cost_model_lets_a_small_chunk_ride_along_the_weight_reads():
    from benchmarks.simulate_steps import StepCosts

    additive, roofline = StepCosts(), StepCosts(model="roofline")
    # 64 decodes and 100 prompt rows: 164 rows x 0.02 ms < the 5 ms weight read
    assert roofline.of(65, 64, 100, 0) == pytest.approx(5.0 + 0.02 * 65)
    assert additive.of(65, 64, 100, 0) == pytest.approx(5.0 + 0.02 * 100 + 0.02 * 65)
    # 64 decodes and 400 rows: compute bound, each row costs
    assert roofline.of(65, 64, 400, 391) == pytest.approx(0.02 * 464 + 0.02 * 65 + 0.012 * 391)
    with pytest.raises(ValueError, match="unknown cost model"):
        StepCosts(model="linear").of(1, 1, 0, 0)


def test_the_trace_charges_images_encoded_ahead_to_the_step_that_carries_them():
    """A step's new images are its chunks' and those it encodes ahead for
    waiting requests; an image is charged once, where it is first encoded."""
    from benchmarks.simulate_steps import StepTrace
    from pyvlm.scheduling.types import ForwardBatch, MultimodalItem, SamplingParams, SequenceChunk

    ahead, other = MultimodalItem(1, 0, 7), MultimodalItem(2, 0, 5)

    def chunk(items, num_tokens):
        return SequenceChunk("r", [9] * num_tokens, 0, [list(range(num_tokens))], [0], list(items),
                             True, SamplingParams(), 0, 0)

    trace = StepTrace()
    assert trace.record(ForwardBatch(False, [chunk([other], 9)], [ahead]))[1:] == (0, 9, 12)
    assert trace.record(ForwardBatch(False, [chunk([ahead], 8)]))[1:] == (0, 8, 0)


def test_the_slowest_steps_are_listed_slowest_first_with_their_place_in_the_run():
    import random

    from benchmarks.simulate_steps import slowest_steps

    rng = random.Random()
    steps = [(rng.uniform(1, 50), rng.randrange(64), rng.randrange(1024), rng.randrange(400))
             for _ in range(rng.randint(5, 40))]
    rows = slowest_steps(steps, 3).splitlines()[2:]
    expected = sorted(range(len(steps)), key=lambda i: -steps[i][0])[:3]
    assert len(rows) == 3
    for row, i in zip(rows, expected):
        ms, decodes, prefill, images = steps[i]
        assert row == (f"| {ms:.1f} | {i + 1} of {len(steps)} | {decodes} | {prefill} "
                       f"| {images} |")
