"""Prefill logits of Llama-3.2-Vision (mllama) against transformers, through
pyvlm's own prompt path (the checkpoint's chat template, the tiling plans,
cross-attention spans) and its runner, with the images' K/V written into
shuffled pool pages: the prompt ids equal transformers' processor's, and
the logits of every prompt position are within 1e-4 (float32), whole and
in chunks (a chunk may start after the image token: the image K/V are
already in the pool). Also: the hub-layout checkpoint gives the same logits
as its transformers-format twin, and the model refuses what it cannot run."""

import random

import pytest
import torch
from PIL import Image

from pyvlm.scheduling.types import CrossImage, ForwardBatch, SamplingParams, SequenceChunk

TOLERANCE = 1e-4


def random_image(height: int, width: int) -> Image.Image:
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy())


def image_part(image):
    return {"type": "image", "image": image}


def text_part(text):
    return {"type": "text", "text": text}


def conversations():
    """Text only, image then text, text then image, two images with text
    between and after them, an image in an earlier turn; 1 to 4 tiles."""
    wide, tall, square = random_image(50, 110), random_image(150, 50), random_image(120, 120)
    return {
        "text_only": [{"role": "user", "content": [text_part("what is the capital of France?")]}],
        "image_then_text": [{"role": "user", "content": [image_part(square),
                                                         text_part("describe it")]}],
        "text_then_image": [{"role": "user", "content": [text_part("look at this:"),
                                                         image_part(wide)]}],
        "two_images": [{"role": "user", "content": [
            text_part("compare"), image_part(wide), text_part("with"), image_part(tall),
            text_part("which is brighter?")]}],
        "earlier_turn": [
            {"role": "user", "content": [image_part(tall), text_part("what?")]},
            {"role": "assistant", "content": [text_part("a cat on a mat")]},
            {"role": "user", "content": [text_part("and what colour is it?")]}],
    }


def engine_for(checkpoint):
    import pyvlm

    return pyvlm.Engine(model=str(checkpoint), device="cpu", dtype="float32", page_size=4,
                        max_total_tokens=4096)


@pytest.fixture(scope="module", params=["mllama", "mllama_one_cross"])
def checkpoint(request):
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


@pytest.fixture(scope="module")
def engine(checkpoint):
    with engine_for(checkpoint) as engine:
        yield engine


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(checkpoint), dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(str(checkpoint))


def hf_messages(messages):
    return [dict(m, content=[{"type": "image"} if p["type"] == "image" else p
                             for p in m["content"]]) for m in messages]


def images_of(messages):
    return [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]


def reference(hf, messages):
    model, processor = hf
    text = processor.apply_chat_template(hf_messages(messages), add_generation_prompt=True,
                                         tokenize=False)
    images = images_of(messages)
    inputs = processor(text=text, images=images or None, return_tensors="pt",
                       add_special_tokens=False)  # the template holds BOS
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    return inputs["input_ids"][0].tolist(), logits


def run_in_chunks(engine, request, chunk_sizes):
    """The request's prompt through the engine's runner in chunks of the
    given sizes, text and image K/V on shuffled pages; every position's logits."""
    runner = engine.state.runner
    num_tokens = len(request.prompt_ids)
    num_text_pages = -(-num_tokens // runner.page_size)
    image_pages = [-(-item.num_cross_rows // runner.image_rows_per_page)
                   for item in request.mm_items]
    pages = random.sample(range(runner.num_pages), num_text_pages + sum(image_pages))
    text_pages, pages = pages[:num_text_pages], pages[num_text_pages:]
    images = []
    for item, count in zip(request.mm_items, image_pages):
        images.append((item, tuple(pages[:count])))
        pages = pages[count:]
    logits, start = [], 0
    for size in chunk_sizes:
        end = min(num_tokens, start + size)
        if end == start:  # the sizes may cover the prompt before their last one
            break
        chunk = SequenceChunk(
            rid=request.rid, token_ids=request.prompt_ids[start:end], start_pos=start,
            positions=request.positions(start, end), page_table=text_pages,
            mm_items=request.mm_items_overlapping(start, end), sample=end == num_tokens,
            sampling=request.sampling, seed=0, step=0, prompt_ids=request.prompt_ids,
            cross_images=[CrossImage(item, pages, start == 0) for item, pages in images])
        logits.append(runner.token_logits(ForwardBatch(False, [chunk])))
        start = end
    assert start == num_tokens
    return torch.cat(logits)


@pytest.mark.parametrize("name", list(conversations()))
def test_prefill_logits_match_transformers(engine, hf, name):
    messages = conversations()[name]
    ref_ids, ref_logits = reference(hf, messages)
    request = engine.builder.from_messages(messages, SamplingParams())
    try:
        assert request.prompt_ids == ref_ids
        whole = run_in_chunks(engine, request, [len(ref_ids)])
        chunk = random.randint(3, 11)
        chunked = run_in_chunks(engine, request, [chunk] * (len(ref_ids) // chunk + 1))
    finally:
        engine.builder.release(request)
    for out in (whole, chunked):
        err = (out - ref_logits).abs().max().item()
        assert err < TOLERANCE, f"max |logits - transformers| = {err:.3g} ({name})"


def test_the_image_changes_the_text_before_it_as_in_transformers(engine, hf):
    """transformers lets the tokens before the first image attend to every
    image row: their logits depend on the image, and so do pyvlm's."""
    messages = conversations()["text_then_image"]
    other = [dict(messages[0], content=[messages[0]["content"][0],
                                        image_part(random_image(50, 110))])]
    logits = []
    for chat in (messages, other):
        request = engine.builder.from_messages(chat, SamplingParams())
        try:
            logits.append(run_in_chunks(engine, request, [len(request.prompt_ids)]))
        finally:
            engine.builder.release(request)
        first_image = request.mm_items[0].offset
    assert (logits[0][:first_image] - logits[1][:first_image]).abs().max() > 1e-3


def test_the_hub_layout_gives_the_same_logits(tiny_checkpoint_mllama_hub_style):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    checkpoint = tiny_checkpoint_mllama_hub_style
    hf = (AutoModelForImageTextToText.from_pretrained(str(checkpoint), dtype=torch.float32).eval(),
          AutoProcessor.from_pretrained(str(checkpoint)))
    messages = conversations()["two_images"]
    ref_ids, ref_logits = reference(hf, messages)
    with engine_for(checkpoint) as engine:
        request = engine.builder.from_messages(messages, SamplingParams())
        try:
            assert request.prompt_ids == ref_ids
            logits = run_in_chunks(engine, request, [len(ref_ids)])
        finally:
            engine.builder.release(request)
    assert (logits - ref_logits).abs().max().item() < TOLERANCE


def test_unsupported_text_activations_are_refused():
    from tests.tiny_mllama import mllama_config

    from pyvlm.models.mllama import MllamaForConditionalGeneration

    config = mllama_config()
    config.text_config.hidden_act = "gelu"
    with pytest.raises(NotImplementedError, match="gelu"):
        MllamaForConditionalGeneration(config)


def test_pyvlm_tiles_stand_in_equals_transformers_processor(engine, hf):
    """tests/hf_reference.MllamaPyvlmTiles (what the CUDA parity test feeds
    transformers, whose GPU machine has another Pillow) is transformers'
    own processor output here, padding tiles and masks included."""
    from tests.hf_reference import MllamaPyvlmTiles

    images = [random_image(50, 110), random_image(120, 120), random_image(30, 200)]
    expected = hf[1].image_processor(images=[images], return_tensors="pt")
    got = MllamaPyvlmTiles(engine.builder.images.processor)([images])
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(expected[key])), key
    assert got["num_tiles"] == [list(n) for n in expected["num_tiles"]]


@pytest.mark.cuda
@pytest.mark.parametrize("tiles", [[4], [1, 3]])
def test_cuda_tower_inputs_make_no_host_sync(tiles):
    """The tower's inputs reach the GPU without a host wait: a pageable
    copy that is not non_blocking waits for the stream's queued work (the
    step in flight; on the vision side stream, the towers encoded ahead),
    which held every stream for a 4-tile tower."""
    from types import SimpleNamespace

    from pyvlm.models.mllama import MllamaForConditionalGeneration, PreparedTiles

    prepared = [PreparedTiles(torch.randn(n, 3, 8, 8, device="cuda"), 5 + n) for n in tiles]
    owner = SimpleNamespace(max_num_tiles=4)
    torch.cuda.set_sync_debug_mode("error")
    try:
        pixels, ids, mask = MllamaForConditionalGeneration._tower_inputs(
            owner, prepared, torch.device("cuda"), torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ids.tolist() == [[5 + n for n in tiles]]
    assert mask.tolist() == [[[1] * n + [0] * (4 - n) for n in tiles]]
    assert pixels.shape == (1, len(tiles), 4, 3, 8, 8) and pixels.dtype == torch.bfloat16
