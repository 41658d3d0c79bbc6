"""A repetition penalty through the engine (the runner's device penalty
state, pyvlm.runner.penalty_state) gives transformers' greedy tokens with
the same penalty: 8 concurrent requests of different lengths, so the state
holds rows of finished and running requests side by side."""

import pytest
import torch

from pyvlm.scheduling.types import SamplingParams
from tests.entrypoints.test_engine_parity import engine_for, make_prompts
from tests.hf_reference import greedy_tokens, reference_inputs_for

PENALTY = 1.3


@pytest.fixture(scope="module", params=["qwen2", "qwen2_vl"])
def checkpoint(request):
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


def test_repetition_penalty_matches_transformers(checkpoint):
    from transformers import AutoModelForImageTextToText

    hf_model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with engine_for(checkpoint) as engine:
        prompts = make_prompts(seed=6, image=engine.builder.image_token)
        lengths = [6 + 3 * i for i in range(len(prompts))]
        params = [{"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True,
                   "repetition_penalty": PENALTY} for n in lengths]
        results = engine.generate([p for p, _ in prompts], params,
                                  image_data=[ims for _, ims in prompts])
        image_inputs = reference_inputs_for(engine.state.files)
        prompt_ids = [engine.builder.from_prompt(p, ims, SamplingParams()).prompt_ids
                      for p, ims in prompts]
    for (prompt, images), ids, result, n in zip(prompts, prompt_ids, results, lengths):
        expected = greedy_tokens(hf_model, image_inputs, ids, images, n,
                                 repetition_penalty=PENALTY)
        assert result["output_ids"] == expected, prompt
