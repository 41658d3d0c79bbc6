"""Prefill logits of Qwen2-VL and Qwen2.5-VL against transformers, through
pyvlm's own prompt path (chat template, image processor, M-RoPE positions)
and its runner: the prompt ids must equal transformers' processor's, and
the logits of every prompt position must be within 1e-4 (float32), whether
the prompt runs whole or in chunks that start and end inside image spans."""

import random

import pytest
import torch
from PIL import Image

from pyvlm.scheduling.types import ForwardBatch, SamplingParams, SequenceChunk
from tests.hf_reference import qwen2_vl_inputs, qwen2_vl_processor

TOLERANCE = 1e-4


def random_image(height: int, width: int) -> Image.Image:
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy())


def image_part(image):
    return {"type": "image", "image": image}


def conversations():
    """(name, messages): text only, one image, two images of different
    sizes in one message, an image in an earlier turn. Fresh pixels each run."""
    first, second = random_image(90, 120), random_image(200, 44)
    return {
        "text_only": [{"role": "user", "content": "what is the capital of France?"}],
        "one_image": [{"role": "user", "content": [image_part(first),
                                                   {"type": "text", "text": "describe it"}]}],
        "two_images": [{"role": "user", "content": [
            {"type": "text", "text": "compare"}, image_part(first),
            {"type": "text", "text": "with"}, image_part(second)]}],
        "earlier_turn": [
            {"role": "user", "content": [image_part(second), {"type": "text", "text": "what?"}]},
            {"role": "assistant", "content": "a cat on a mat"},
            {"role": "user", "content": "and what colour is it?"}],
    }


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def checkpoint(request):
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


@pytest.fixture(scope="module")
def engine(checkpoint):
    import pyvlm

    with pyvlm.Engine(model=str(checkpoint), device="cpu", dtype="float32", page_size=4,
                      max_total_tokens=4096) as engine:
        yield engine


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(checkpoint),
                                                       dtype=torch.float32).eval()


def hf_messages(messages):
    """The same chat in the content form transformers' templates take."""
    def part(p):
        return {"type": "image"} if p["type"] == "image" else p
    return [dict(m, content=m["content"] if isinstance(m["content"], str)
                 else [part(p) for p in m["content"]]) for m in messages]


def images_of(messages):
    return [p["image"] for m in messages if not isinstance(m["content"], str)
            for p in m["content"] if p["type"] == "image"]


def reference(hf_model, checkpoint, messages):
    processor = qwen2_vl_processor(checkpoint)
    text = processor.apply_chat_template(hf_messages(messages), tokenize=False,
                                         add_generation_prompt=True)
    inputs = qwen2_vl_inputs(processor, text, images_of(messages))
    with torch.no_grad():
        logits = hf_model(**inputs).logits[0].float()
    return inputs["input_ids"][0].tolist(), logits


def run_in_chunks(engine, request, chunk_sizes):
    """The request's prompt through the engine's runner in chunks of the
    given sizes, on shuffled pages; the logits of every prompt position."""
    runner = engine.state.runner
    num_tokens = len(request.prompt_ids)
    pages = random.sample(range(runner.num_pages), -(-num_tokens // runner.page_size))
    logits, start = [], 0
    for size in chunk_sizes:
        end = min(num_tokens, start + size)
        if end == start:  # the sizes may cover the prompt before their last one
            break
        chunk = SequenceChunk(
            rid=request.rid, token_ids=request.prompt_ids[start:end], start_pos=start,
            positions=request.positions(start, end), page_table=pages,
            mm_items=request.mm_items_overlapping(start, end), sample=end == num_tokens,
            sampling=request.sampling, seed=0, step=0)
        logits.append(runner.token_logits(ForwardBatch(False, [chunk])))
        start = end
    assert start == num_tokens
    return torch.cat(logits)


@pytest.mark.parametrize("name", ["text_only", "one_image", "two_images", "earlier_turn"])
def test_prefill_logits_match_transformers(engine, hf_model, checkpoint, name):
    messages = conversations()[name]
    ref_ids, ref_logits = reference(hf_model, checkpoint, messages)
    request = engine.builder.from_messages(messages, SamplingParams())
    try:
        assert request.prompt_ids == ref_ids
        whole = run_in_chunks(engine, request, [len(ref_ids)])
        chunk = random.randint(3, 11)  # boundaries fall inside the image spans
        chunked = run_in_chunks(engine, request, [chunk] * (len(ref_ids) // chunk + 1))
    finally:
        engine.builder.release(request)
    for out in (whole, chunked):
        err = (out - ref_logits).abs().max().item()
        assert err < TOLERANCE, f"max |logits - transformers| = {err:.3g} ({name})"
