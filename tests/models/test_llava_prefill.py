"""Prefill logits of LLaVA-1.5 and LLaVA-NeXT against transformers through
pyvlm's prompt path (tokenizer, placeholder expansion by its processors)
and runner: the prompt ids are the checkpoint's processor's, and every
position's logits are within 1e-4 (float32), whole and in chunks that cut
image spans."""

import random

import pytest
import torch

from pyvlm.scheduling.types import SamplingParams
from tests.entrypoints.test_engine_parity import random_image
from tests.hf_reference import prefill_logits, reference_inputs_for
from tests.models.test_qwen2_vl import run_in_chunks

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["llava", "llava_next_mistral", "llava_next_llama3"])
def checkpoint(request):
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


@pytest.fixture(scope="module")
def engine(checkpoint):
    import pyvlm

    with pyvlm.Engine(model=str(checkpoint), device="cpu", dtype="float32", page_size=4,
                      max_total_tokens=8192) as engine:
        yield engine


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_prefill_logits_match_transformers(checkpoint, engine, num_images):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    gen = torch.Generator().manual_seed(num_images)
    images = [random_image(h, w, gen) for h, w in ((60, 170), (120, 100))[:num_images]]
    prompt = "compare " + " and ".join(["<image>"] * num_images) + " near the blue hills"
    request = engine.builder.from_prompt(prompt, images, SamplingParams(),
                                         add_special_tokens=True)
    model = AutoModelForImageTextToText.from_pretrained(str(checkpoint), dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(checkpoint))
    hf_ids = processor(text=prompt, images=images or None, return_tensors="pt")["input_ids"]
    try:
        assert request.prompt_ids == hf_ids[0].tolist()
        expected = prefill_logits(model.eval(), reference_inputs_for(engine.state.files),
                                  request.prompt_ids, images)
        whole = run_in_chunks(engine, request, [len(request.prompt_ids)])
        size = random.randint(3, 11)
        chunked = run_in_chunks(engine, request, [size] * (len(request.prompt_ids) // size + 1))
    finally:
        engine.builder.release(request)
    for out in (whole, chunked):
        assert (out - expected).abs().max().item() < TOLERANCE
